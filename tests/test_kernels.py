"""Each Triton kernel against its float64 reference and the naive module path.

Outputs are poisoned with NaN before each launch, so an unwritten element fails.
Low precision is judged by the framework's own error (helpers.assert_parity).
Without CUDA the kernels run in Triton's interpreter (conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_parity
from internvit_fast.kernels import (INTERPRETING, REGISTRY, gelu_launch, linear_gelu, linear_launch, linear_ref,
                                    linear_residual_norm, qk_norm, qk_norm_launch, qk_norm_ref, residual_rms_norm,
                                    residual_rms_norm_launch, rms_norm, rms_norm_launch, rms_norm_ref)
from internvit_fast.kernels import block_ops, gemm, launch
from internvit_fast.kernels.registry import Shape, float64, run
from internvit_fast.model import LayerScale, Mlp, RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _rms_module(weight):
    m = RMSNorm(weight.shape[0]).to(weight.device, weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


# --- every registered kernel, through what it states about itself ----------------------

# (rows, width, hidden): one row, primes, the 504px token count; widths not powers of two, and
# 100/200 whose bf16 rows (200 bytes) TMA cannot take: the GEMMs' pointer path.
SHAPES = [(1, 64, 96), (37, 96, 384), (13, 100, 200), pytest.param(1297, 96, 160, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, hidden", SHAPES)
@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.id)
def test_registered_kernel_matches_reference(device, spec, rows, width, hidden, dtype):
    inputs = spec.make_inputs(Shape(rows, width, hidden, dtype), device)
    got = run(spec, inputs)  # outputs start as NaN
    if spec.judge is not None:  # FP8: equality for quantization, the rule on dequantized values
        spec.judge(got, inputs)
        return
    same, exact = spec.reference(inputs), spec.reference(float64(inputs))
    assert got.keys() == same.keys()
    for name in got:
        assert_parity(got[name], exact[name], same[name], atol=ATOL[dtype], what=f"{spec.id} {name}")


@pytest.mark.parametrize("spec", [s for s in REGISTRY if s.choice], ids=lambda s: s.id)
def test_fused_and_unfused_alternatives_agree(device, spec):
    inputs = spec.make_inputs(Shape(37, 96, 160, torch.bfloat16), device)
    fused, unfused = spec.choice.fused(inputs), spec.choice.unfused(inputs)
    assert fused.keys() == unfused.keys()
    if spec.judge is not None:  # FP8: the spec's own judge (equality where it promises it)
        spec.judge(fused, inputs)
        (spec.choice.unfused_judge or spec.judge)(unfused, inputs)  # (bf16 attention beside FP8's: its own)
        return
    ref = (spec.choice_reference or spec.reference)(inputs)
    exact = (spec.choice_reference or spec.reference)(float64(inputs))
    for impl in (fused, unfused):
        assert impl.keys() == ref.keys()
        for name in impl:
            assert_parity(impl[name], exact[name], ref[name], atol=1e-3, what=f"{spec.id} {name}")


def test_registry_entries_are_unique_and_the_ops_are_custom_ops():
    ids = [s.id for s in REGISTRY]
    assert len(ids) == len(set(ids))
    for name in ("rms_norm", "residual_rms_norm", "qk_norm", "linear_gelu", "linear_residual_norm",
                 "mlp_residual_norm"):
        assert hasattr(torch.ops.internvit_fast, name), name


# --- RMSNorm and the residual add ---------------------------------------------------------

def test_reference_is_the_module_path(device):
    """rms_norm_ref is what RMSNorm and LayerScale modules compute, bit for bit, so a wrong
    reference cannot pass the kernel tests."""
    for dtype in DTYPES:
        x, y = _rand(9, 96, dtype=dtype, device=device, scale=3), _rand(9, 96, dtype=dtype, device=device)
        w, g = _rand(96, dtype=dtype, device=device) + 1, _rand(96, dtype=dtype, device=device, scale=0.3)
        with torch.no_grad():
            ls = LayerScale(96, 1.0).to(device, dtype)
            ls.gamma.copy_(g)
            x_new = x + ls(y)
            want = (x_new, _rms_module(w)(x_new))
            plain = _rms_module(w)(x)
        got = rms_norm_ref(x, w, 1e-6, residual=y, gamma=g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(rms_norm_ref(x, w, 1e-6), plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, n", [(7, 96), (37, 100), (31, 3200)])
@pytest.mark.parametrize("gamma, norm, force_fp32", [
    (True, True, False), (True, True, True), (False, True, False), (True, False, False), (False, False, False)])
def test_residual_rms_norm_matches_module_path(device, dtype, rows, n, gamma, norm, force_fp32):
    x = _rand(rows, n, dtype=dtype, device=device, scale=3.0)
    y = _rand(rows, n, dtype=dtype, device=device)
    g = _rand(n, dtype=dtype, device=device, scale=0.3) if gamma else None
    w = _rand(n, dtype=dtype, device=device) + 1 if norm else None
    x_out = _nan((rows, n), dtype, device)
    h_out = _nan((rows, n), dtype, device) if norm else None
    residual_rms_norm_launch(x, y, g, w, 1e-6, x_out, h_out)
    with torch.no_grad():  # the naive path: LayerScale module, residual add, RMSNorm module
        ls = LayerScale(n, 1.0, force_fp32).to(device, dtype)
        if gamma:
            ls.gamma.copy_(g)
        x_naive = x + (ls(y) if gamma else y)
    # Rounding points are upstream's: the residual stream is the same bits in every dtype.
    assert torch.equal(x_out, x_naive)
    if norm:
        with torch.no_grad():
            h_naive = _rms_module(w)(x_naive)
        # Judged on the float64 norm of the rounded stream, which both paths normalise.
        assert_parity(h_out, rms_norm_ref(x_naive.double(), w.double()), h_naive, what="h")


def test_rms_norm_strided_rows_leading_dims_and_untouched_padding(device):
    buf = _rand(2, 5, 160, dtype=torch.bfloat16, device=device)
    x = buf[..., :96]  # strided rows inside a 3-D tensor
    w = _rand(96, dtype=torch.bfloat16, device=device)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape
    assert_parity(y, rms_norm_ref(x.double(), w.double()), rms_norm_ref(x, w))
    out = _nan((2, 5, 160), torch.bfloat16, device)
    rms_norm_launch(x, w, 1e-6, out[..., :96])
    assert torch.isnan(out[..., 96:]).all(), "kernel wrote outside its rows"


def test_residual_rms_norm_op_without_norm_returns_empty(device):
    x = _rand(3, 96, dtype=torch.bfloat16, device=device)
    y = _rand(3, 96, dtype=torch.bfloat16, device=device)
    x_new, h = residual_rms_norm(x, y, None, None, 1e-6)
    assert h.numel() == 0 and torch.equal(x_new, x + y)


# --- QK-norm --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_matches_module_path_and_leaves_v(device, dtype):
    c = 100
    qkv = _rand(2, 7, 3 * c, dtype=dtype, device=device, scale=2.0)
    before = qkv.clone()
    wq, wk = (_rand(c, dtype=dtype, device=device) + 1 for _ in range(2))
    out = _nan((2, 2, 7, c), dtype, device)
    qk_norm_launch(qkv, wq, wk, 1e-6, out)
    q, k, _ = qkv.split(c, dim=-1)
    with torch.no_grad():  # the naive path: Attention's q_norm/k_norm modules
        naive = torch.stack([_rms_module(wq)(q), _rms_module(wk)(k)])
    assert_parity(out, qk_norm_ref(qkv.double(), wq.double(), wk.double()), naive, what=f"qk_norm {dtype}")
    assert torch.equal(qkv, before), "qkv (and v in it) must not be written"


def test_qk_norm_strided_rows(device):
    c = 96
    qkv = _rand(2, 9, 3 * c + 40, dtype=torch.bfloat16, device=device)[..., 20:20 + 3 * c]
    wq, wk = _rand(c, dtype=torch.bfloat16, device=device), _rand(c, dtype=torch.bfloat16, device=device)
    out = qk_norm(qkv, wq, wk, 1e-6)
    assert out.shape == (2, 2, 9, c) and out.is_contiguous()
    assert_parity(out, qk_norm_ref(qkv.double(), wq.double(), wk.double()), qk_norm_ref(qkv, wq, wk))


def test_fused_attention_hands_views_to_attention(device, monkeypatch):
    """q and k reach attention as views of the qk_norm output, v as a view of the qkv
    projection: nothing is copied between the kernels and attention."""
    from internvit_fast import attention
    from internvit_fast.model import Attention
    attn = Attention(96, 3, qkv_bias=True, qk_normalization=True, use_flash_attn=True).to(device)
    h = torch.randn(2, 9, 96, device=device)
    seen = {}
    real_linear, real_qk = F.linear, torch.ops.internvit_fast.qk_norm

    def spy_linear(x, w, b=None):
        out = real_linear(x, w, b)
        if w is attn.qkv.weight:
            seen["qkv"] = out
        return out

    def spy_attend(q, k, v, scale, use_flash):
        seen.update(q=q, k=k, v=v)
        return attention.naive_attention(q, k, v, scale)

    monkeypatch.setattr("internvit_fast.kernels.block_ops.F.linear", spy_linear)
    monkeypatch.setattr(attention, "attend", spy_attend)
    with torch.no_grad():
        got = attn.forward_fused(h)
    qkv = seen["qkv"]
    assert seen["v"].untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert seen["v"].data_ptr() == qkv[..., 192:].data_ptr() and seen["v"].stride(-1) == 1
    assert seen["q"].untyped_storage().data_ptr() == seen["k"].untyped_storage().data_ptr()
    assert seen["k"].data_ptr() - seen["q"].data_ptr() == 2 * 9 * 96 * seen["q"].element_size()
    with torch.no_grad():
        q, k, v = qkv.split(96, dim=-1)
        want = attn._attend(attn.q_norm(q), attn.k_norm(k), v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert real_qk is torch.ops.internvit_fast.qk_norm


# --- the GEMM: epilogues, TMA and pointer paths, tile order ---------------------------------

def _gemm_inputs(m, k, n, dtype, device, integer=False):
    if integer:  # small integers: every product and partial sum is exact in fp32, in any order
        # (up to 16 x 16 x K: sums need more bits than bf16/fp16 hold, so the output rounds)
        a = torch.randint(-16, 17, (m, k), device=device).to(dtype)
        w = torch.randint(-16, 17, (n, k), device=device).to(dtype)
        b = torch.randint(-999, 1000, (n,), device=device).to(dtype)
    else:
        a, w = _rand(m, k, dtype=dtype, device=device), _rand(n, k, dtype=dtype, device=device, scale=k ** -0.5 * 2)
        b = _rand(n, dtype=dtype, device=device, scale=0.5)
    return a, w, b


CONFIG_CASES = {
    "tma-split": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2, num_warps=4, num_stages=1),
    # stream-K: 3 programs (the interpreter's 3 "SMs"), and 6 over pointers with the programs'
    # work in reverse order, so a cut tile's pieces meet the other way round
    "stream-k": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2, num_warps=4, num_stages=1,
                     STREAM_K=True),
    "stream-k-reversed": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, EPI_SPLIT=1, num_warps=4, num_stages=1,
                              STREAM_K=True, CTAS_PER_SM=2, REVERSE_PROGRAMS=True, USE_TMA=False),
    "tma-whole": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=3, EPI_SPLIT=1, num_warps=4, num_stages=1),
    "pointers": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2, num_warps=4, num_stages=1,
                     USE_TMA=False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", ["gelu", "residual", "none"])
@pytest.mark.parametrize("cfg", list(CONFIG_CASES), ids=str)
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (70, 96, 72), (37, 80, 200)])
def test_linear_epilogues(device, dtype, epilogue, cfg, m, k, n):
    a, w, b = _gemm_inputs(m, k, n, dtype, device)
    g = _rand(n, dtype=dtype, device=device, scale=0.3) if epilogue == "residual" else None
    x = _rand(m, n, dtype=dtype, device=device, scale=3) if epilogue == "residual" else None
    out = _nan((m, n), dtype, device)
    linear_launch(a, w, b, out, epilogue, gamma=g, residual=x, config=CONFIG_CASES[cfg])
    exact = linear_ref(a.double(), w.double(), b.double(), epilogue, None if g is None else g.double(),
                       None if x is None else x.double())
    assert_parity(out, exact, linear_ref(a, w, b, epilogue, g, x), atol=ATOL[dtype], what=f"{epilogue} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(CONFIG_CASES), ids=str)
@pytest.mark.parametrize("gamma", [True, False])
def test_linear_residual_epilogue_is_bit_exact(device, dtype, cfg, gamma):
    """With a GEMM that is exact in fp32 (integer operands), the residual epilogue's stream is
    nn.Linear + LayerScale + add of the reference path, bit for bit: the same rounding points."""
    m, k, n = 45, 96, 64
    a, w, b = _gemm_inputs(m, k, n, dtype, device, integer=True)
    g = _rand(n, dtype=dtype, device=device, scale=0.3) if gamma else None
    x = _rand(m, n, dtype=dtype, device=device, scale=50)
    out = _nan((m, n), dtype, device)
    linear_launch(a, w, b, out, "residual", gamma=g, residual=x, config=CONFIG_CASES[cfg])
    with torch.no_grad():  # the module path: nn.Linear (fc2), LayerScale, residual add
        mlp = Mlp(n, k).to(device, dtype)
        mlp.fc2.weight.copy_(w)
        mlp.fc2.bias.copy_(b)
        h = mlp.fc2(a)
        if dtype != torch.float32:  # the GEMM's result must round to the dtype, or nothing is tested
            assert not torch.equal(h.float(), F.linear(a.float(), w.float(), b.float()))
        if gamma:
            ls = LayerScale(n, 1.0).to(device, dtype)
            ls.gamma.copy_(g)
            h = ls(h)
        want = x + h
    assert torch.equal(out, want), (out.double() - want.double()).abs().max()


def test_linear_gelu_matches_module_path(device):
    a, w, b = _gemm_inputs(37, 96, 384, torch.bfloat16, device)
    with torch.no_grad():  # the naive path: Mlp.fc1 then nn.GELU
        mlp = Mlp(96, 384).to(device, torch.bfloat16)
        mlp.fc1.weight.copy_(w)
        mlp.fc1.bias.copy_(b)
        naive = mlp.act(mlp.fc1(a))
    got = linear_gelu(a.view(1, 37, 96), w, b)
    assert got.shape == (1, 37, 384)
    assert_parity(got[0], linear_ref(a.double(), w.double(), b.double(), "gelu"), naive, atol=1e-3)


def test_tile_order_covers_every_tile_once_in_balanced_groups(device):
    import triton
    import triton.language as tl

    @triton.jit
    def coords(OUT, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        t = tl.program_id(0)
        pm, pn = gemm.tile_coords(t, num_pid_m, num_pid_n, GROUP_M)
        tl.store(OUT + 2 * t, pm)
        tl.store(OUT + 2 * t + 1, pn)

    for num_pid_m, num_pid_n, group in [(41, 5, 8), (8, 3, 8), (1, 4, 8), (10, 2, 3), (9, 2, 4), (17, 3, 8)]:
        out = torch.full((num_pid_m * num_pid_n, 2), -1, dtype=torch.int32, device=device)
        coords[(num_pid_m * num_pid_n,)](out, num_pid_m, num_pid_n, GROUP_M=group)
        pairs = [tuple(p) for p in out.tolist()]
        assert sorted(pairs) == [(i, j) for i in range(num_pid_m) for j in range(num_pid_n)]
        # Walk the order group by group: a group's tiles cover its rows x every column,
        # rows varying fastest; groups differ in size by at most one and hold <= GROUP_M rows.
        sizes, t, first = [], 0, 0
        while t < len(pairs):
            size = 1
            while t + size < len(pairs) and pairs[t + size][1] == pairs[t][1] and pairs[t + size][0] == first + size:
                size += 1
            chunk = pairs[t:t + size * num_pid_n]
            assert chunk == [(first + i % size, i // size) for i in range(size * num_pid_n)], (num_pid_m, group)
            sizes.append(size)
            t, first = t + size * num_pid_n, first + size
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= group, (num_pid_m, group, sizes)
        assert len(sizes) == -(-num_pid_m // group)


# Stream-K's tests: 32x32 tiles and 16-deep K-steps, so small shapes have tiles to cut
SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, EPI_SPLIT=2, num_warps=4, num_stages=1)


def _cut_tiles(tiles, k_tiles, programs):
    """The tiles stream-K cuts in two, worked out here independently of the kernel: the last
    (tiles mod P) + P tiles' K-steps split into P equal ranges (floor of p * steps / P)."""
    rem = tiles % programs
    if rem == 0 or tiles <= programs:
        return set()
    first, steps = tiles - rem - programs, (rem + programs) * k_tiles
    edges = [p * steps // programs for p in range(1, programs)]
    return {first + e // k_tiles for e in edges if e % k_tiles}


def test_stream_k_schedule_covers_every_k_step_once(device):
    """Every tile's K-steps [0, k_tiles) are covered exactly once over all programs' units; a
    tile is whole or cut once, at the edge between programs p and p + 1 (p holding its start),
    and both pieces name the same workspace slot; programs' K-steps differ by at most one
    tile's round plus one step."""
    import triton
    import triton.language as tl

    @triton.jit
    def schedule(OUT, num_tiles, k_tiles, MAX_UNITS: tl.constexpr, PROGRAMS: tl.constexpr):
        pid = tl.program_id(0)
        dp_tiles, dp_units, sk_lo, sk_hi, units = gemm.stream_k_ranges(num_tiles, k_tiles, pid, PROGRAMS)
        for u in range(units):
            tile, k_lo, k_hi = gemm.work_unit(u, pid, dp_units, sk_lo, sk_hi, dp_tiles, k_tiles, PROGRAMS)
            row = OUT + (pid * MAX_UNITS + u) * 3
            tl.store(row, tile)
            tl.store(row + 1, k_lo)
            tl.store(row + 2, k_hi)

    for programs in (1, 3, 6, 8):
        for tiles in (1, 2, 3, 5, 6, 7, 11, 12, 13, 41):
            for k_tiles in (1, 2, 3, 7):
                grid = min(programs, tiles)
                most = -(-tiles // programs) + 3
                out = torch.full((grid, most, 3), -1, dtype=torch.int32, device=device)
                schedule[(grid,)](out, tiles, k_tiles, MAX_UNITS=most, PROGRAMS=programs)
                pieces = {}  # tile -> [(k_lo, k_hi, program)]
                steps = [0] * grid
                for pid, rows in enumerate(out.tolist()):
                    for tile, k_lo, k_hi in rows:
                        if tile >= 0:
                            assert 0 <= k_lo < k_hi <= k_tiles and tile < tiles
                            pieces.setdefault(tile, []).append((k_lo, k_hi, pid))
                            steps[pid] += k_hi - k_lo
                case = (programs, tiles, k_tiles)
                assert sorted(pieces) == list(range(tiles)), case
                cut = set()
                for tile, ps in pieces.items():
                    ps.sort()
                    assert [p[:2] for p in ps] in ([(0, k_tiles)], [(0, ps[0][1]), (ps[0][1], k_tiles)]), case
                    if len(ps) == 2:
                        cut.add(tile)
                        (lo0, _, p0), (lo1, _, p1) = ps
                        assert p1 == p0 + 1, case
                        assert p0 - (lo0 > 0) == p1 - (lo1 > 0), case  # the slot each piece names
                assert cut == _cut_tiles(tiles, k_tiles, programs), case
                if tiles > programs and tiles % programs:
                    assert max(steps) - min(steps) <= 1, case  # whole rounds, then equal ranges


@pytest.mark.parametrize("epilogue", ["gelu", "residual"])
@pytest.mark.parametrize("k", [112, 100], ids=["even-k", "ragged-k"])
def test_stream_k_cut_tiles_meet_in_either_order(device, epilogue, k):
    """The same bits whichever piece of a cut tile is counted second (the interpreter runs
    programs in order; REVERSE_PROGRAMS runs their work the other way round), on random
    inputs, and the same result as the tiles left whole, within the parity rule; with a
    last K-step that is partly past K (masked on the pointer path); and the residual
    epilogue in place (out is the stream), where a piece that is not the tile's last to
    arrive and still wrote the tile would corrupt the stream the other piece reads."""
    m, n = 100, 50  # 4 x 2 tiles of 32, 7 K-steps of 16, on 3 and on 6 programs
    a, w, b = _gemm_inputs(m, k, n, torch.bfloat16, device)
    g = _rand(n, dtype=torch.bfloat16, device=device, scale=0.3) if epilogue == "residual" else None
    x = _rand(m, n, dtype=torch.bfloat16, device=device, scale=3) if epilogue == "residual" else None
    base = SMALL_TILES
    for ctas in (1, 2):
        assert _cut_tiles(8, 7, 3 * ctas), "nothing cut: the test would test nothing"
        outs = []
        for cfg in (dict(base, CTAS_PER_SM=ctas), dict(base, CTAS_PER_SM=ctas, STREAM_K=True),
                    dict(base, CTAS_PER_SM=ctas, STREAM_K=True, REVERSE_PROGRAMS=True)):
            out = _nan((m, n), torch.bfloat16, device)
            linear_launch(a, w, b, out, epilogue, gamma=g, residual=x, config=cfg)
            outs.append(out)
        whole, forward, backward = outs
        assert torch.equal(forward, backward)
        if epilogue == "residual":
            for reverse in (False, True):
                stream = x.clone()
                linear_launch(a, w, b, stream, epilogue, gamma=g, residual=stream,
                              config=dict(base, CTAS_PER_SM=ctas, STREAM_K=True, REVERSE_PROGRAMS=reverse))
                assert torch.equal(stream, forward), f"in place, reversed={reverse}"
        exact = linear_ref(a.double(), w.double(), b.double(), epilogue, None if g is None else g.double(),
                           None if x is None else x.double())
        assert_parity(forward, exact, whole, atol=1e-3, what=f"stream-K {epilogue}")


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter's program order is what REVERSE_PROGRAMS turns round")
def test_reverse_programs_turns_the_meeting_round(monkeypatch):
    """Which piece of a cut tile finishes it: the one ending the tile when programs run in
    order, the one starting it under REVERSE_PROGRAMS (a meeting that poisons tiles finished
    by their starting piece tells them apart). Without this the either-order test could
    pass with the knob doing nothing."""
    from gate_mutations import meet_partial_start_poisons
    monkeypatch.setattr(gemm, "meet_partial", meet_partial_start_poisons)
    m, k, n = 100, 112, 50
    a, w, b = _gemm_inputs(m, k, n, torch.bfloat16, "cpu")
    base = dict(SMALL_TILES, STREAM_K=True)
    nans = []
    for reverse in (False, True):
        out = _nan((m, n), torch.bfloat16, "cpu")
        linear_launch(a, w, b, out, "none", config=dict(base, REVERSE_PROGRAMS=reverse))
        nans.append(int(out.isnan().sum()))
    assert nans[0] == 0 and nans[1] > 0, nans


def test_stream_k_workspace_only_where_a_tile_is_cut(monkeypatch):
    """No workspace and no counters to zero (a launch) where nothing is cut: tiles a whole
    number of rounds, fewer tiles than programs, or a single K-step per tile; the same
    pointer types either way (one binary)."""
    from internvit_fast.kernels.launch import Meta, Target
    target = Target("interpreter", 3, {})
    cfg = dict(SMALL_TILES, STREAM_K=True)
    for (m, n, k), cut in {(128, 64, 64): True, (96, 64, 64): False, (64, 32, 64): False, (128, 64, 16): False,
                           (128, 64, 17): True}.items():
        bf = torch.bfloat16
        plan = gemm.plan_linear(Meta.contiguous((m, k), bf), Meta.contiguous((n, k), bf), Meta.contiguous((m, n), bf),
                                "none", target, config=cfg)
        assert cut == bool(_cut_tiles(-(-m // 32) * -(-n // 32), -(-k // 16), 3)), (m, n, k)
        assert (plan.args["WORKSPACE"].dtype, plan.args["COUNTERS"].dtype) == (torch.float32, torch.int32)
        assert plan.args["WORKSPACE"].shape == ((2, 2, 32 * 32) if cut else (1,)), (m, n, k)
        zeroed = []
        real_zeros = torch.zeros
        monkeypatch.setattr(torch, "zeros", lambda *a, **kw: zeroed.append(a) or real_zeros(*a, **kw))
        out = _nan((m, n), bf, "cpu")
        linear_launch(_rand(m, k, dtype=bf, device="cpu"), _rand(n, k, dtype=bf, device="cpu"), None, out,
                      config=cfg)
        monkeypatch.undo()
        assert bool(zeroed) == cut and not out.isnan().any(), (m, n, k)
    # two programs: one slot, and still a whole slot of two partial tiles
    bf = torch.bfloat16
    plan = gemm.plan_linear(Meta.contiguous((96, 64), bf), Meta.contiguous((32, 64), bf), Meta.contiguous((96, 32), bf),
                            "none", Target("interpreter", 1, {}), config=dict(cfg, CTAS_PER_SM=2))
    assert _cut_tiles(3, 4, 2) and plan.args["WORKSPACE"].shape == (1, 2, 32 * 32)


def test_stream_k_settings_are_checked():
    with pytest.raises(ValueError, match="STREAM_K and FLATTEN"):
        a = torch.zeros(4, 32, dtype=torch.bfloat16)
        linear_launch(a, torch.zeros(32, 32, dtype=torch.bfloat16), None, torch.empty(4, 32, dtype=torch.bfloat16),
                      config=dict(gemm.CONFIGS["interpreter", "gelu"], FLATTEN=True))


def test_gelu_kernel_in_place(device):
    x = _rand(7, 300, dtype=torch.bfloat16, device=device, scale=3)
    want = F.gelu(x)
    exact = F.gelu(x.double())
    assert gelu_launch(x, x) is x
    assert_parity(x, exact, want, what="in place")


# --- fused or unfused: the tuned table's choice ------------------------------------------------

@pytest.fixture
def unfused_table(tuned_table):
    """A tuned table that says the unfused alternatives won, on a card called sm90."""
    tuned_table({"configs": {name: [{"shape": {"M": 9, "N": n, "K": k, "dtype": "bf16"}, "impl": "unfused"}]
                             for name, n, k in (("linear_gelu", 384, 96), ("linear_residual", 96, 384))}})


def test_choice_runs_the_alternative_the_table_names(device, monkeypatch, unfused_table):
    calls = []
    for name in ("gelu_fused", "gelu_unfused", "residual_fused", "residual_unfused"):
        real = getattr(block_ops, name)
        monkeypatch.setattr(block_ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    bf = dict(dtype=torch.bfloat16, device=device)
    h, w1, b1 = _rand(9, 96, **bf), _rand(384, 96, **bf, scale=0.1), _rand(384, **bf)
    u = linear_gelu(h, w1, b1)
    w2, b2, g, x, nw = _rand(96, 384, **bf, scale=0.05), _rand(96, **bf), _rand(96, **bf), _rand(9, 96, **bf), \
        _rand(96, **bf)
    x_new, h2 = linear_residual_norm(u, w2, b2, g, x, nw, 1e-6)
    linear_gelu(_rand(9, 64, **bf), _rand(384, 64, **bf), None)  # K=64 is not in the table: fused
    assert calls == ["gelu_unfused", "residual_unfused", "gelu_fused"]
    want_x, want_h = rms_norm_ref(x, nw, 1e-6, residual=F.linear(u, w2, b2), gamma=g)
    assert torch.equal(x_new, want_x) and torch.equal(h2, want_h)
    assert_parity(u, linear_ref(h.double(), w1.double(), b1.double(), "gelu"), linear_ref(h, w1, b1, "gelu"))


def test_choice_defaults_to_fused():
    from internvit_fast.kernels.launch import Target
    assert launch.choice("linear_gelu", Target("sm90", 132), M=5188, N=12800, K=3200, dtype=torch.bfloat16) == "fused"


# --- bad input: clear errors before any launch ----------------------------------------------

def test_bad_inputs_raise_before_launch(device):
    bf = dict(dtype=torch.bfloat16, device=device)
    x, w = _rand(4, 96, **bf), _rand(96, **bf)
    with pytest.raises(ValueError, match="x has dtype torch.int32"):
        rms_norm(x.int(), w)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(x, w.view(1, 96))
    with pytest.raises(ValueError, match="last dimension is 96, expected 95"):
        rms_norm(x, w[:95])
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(_rand(96, 4, **bf).t(), w)
    with pytest.raises(ValueError, match="rows are 20000 wide"):
        rms_norm(_rand(1, 20000, **bf), _rand(20000, **bf))
    with pytest.raises(ValueError, match="not 3 \\* C"):
        qk_norm(_rand(2, 95, **bf), w, w)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        qk_norm(_rand(2, 3 * 96, **bf), w[:10], w[:10])
    with pytest.raises(ValueError, match="y is \\(4, 95\\)"):
        residual_rms_norm(x, _rand(4, 95, **bf), None, w)
    with pytest.raises(ValueError, match="gamma must have shape"):
        residual_rms_norm(x, x, w[:3], w)
    out = _nan((4, 8), torch.bfloat16, device)
    with pytest.raises(ValueError, match="a must be 2-D \\(M, 96\\)"):
        linear_launch(_rand(4, 95, **bf), _rand(8, 96, **bf), None, out)
    with pytest.raises(ValueError, match="weight has dtype torch.float32; expected torch.bfloat16"):
        linear_gelu(x, _rand(8, 96, dtype=torch.float32, device=device), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_gelu(x, _rand(8, 96, **bf), _rand(7, **bf))
    with pytest.raises(ValueError, match="needs the residual stream"):
        linear_launch(x, _rand(8, 96, **bf), None, out, "residual")
    with pytest.raises(ValueError, match="residual must have shape \\(4, 8\\)"):
        linear_launch(x, _rand(8, 96, **bf), None, out, "residual", residual=_rand(4, 9, **bf))
    with pytest.raises(ValueError, match="epilogue must be one of"):
        linear_launch(x, _rand(8, 96, **bf), None, out, "relu")
    with pytest.raises(ValueError, match="gelu: out must be"):
        gelu_launch(x, _rand(4, 95, **bf))
    with pytest.raises(ValueError, match="x is 0-d"):
        rms_norm(_rand(1, **bf)[0], _rand(1, **bf))


@pytest.mark.skipif(torch.cuda.is_available(), reason="about Triton's interpreter on a CPU")
def test_interpreter_that_cannot_run_gets_one_clear_error(monkeypatch):
    """A triton whose interpreter fails (3.6 with numpy >= 2.3) is named, with the versions,
    before a kernel launches, instead of an InterpreterError deep inside one."""
    import numpy
    import triton

    from internvit_fast.kernels import common as _common

    class Broken:
        def __getitem__(self, grid):
            def launch(*args):
                raise ValueError("only 0-dimensional arrays can be converted to Python scalars")
            return launch
    assert _common.interpreter_problem() == ""  # this machine's pair of versions works
    monkeypatch.setattr(_common, "_interpreter_probe", Broken())
    _common.interpreter_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=rf"rms_norm: .*triton {triton.__version__} with numpy "
                                               rf"{numpy.__version__}.*numpy < 2.3"):
            rms_norm(_rand(4, 96, dtype=torch.float32, device="cpu"), _rand(96, dtype=torch.float32, device="cpu"))
    finally:
        _common.interpreter_problem.cache_clear()


def test_kernels_write_only_inside_their_outputs(device):
    """Outputs that are windows of larger NaN buffers: everything outside stays NaN."""
    bf = dict(dtype=torch.bfloat16, device=device)
    a, w, b = _rand(37, 96, **bf), _rand(200, 96, **bf, scale=0.2), _rand(200, **bf)
    for cfg in CONFIG_CASES.values():
        big = _nan((37, 300), torch.bfloat16, device)
        linear_launch(a, w, b, big[:, 48:248], "gelu", config=cfg)  # 96-byte offset: TMA-aligned
        assert not torch.isnan(big[:, 48:248]).any()
        assert torch.isnan(big[:, :48]).all() and torch.isnan(big[:, 248:]).all()

    x, y, g = _rand(13, 96, **bf), _rand(13, 96, **bf), _rand(96, **bf)
    xb, hb = _nan((13, 160), torch.bfloat16, device), _nan((13, 160), torch.bfloat16, device)
    residual_rms_norm_launch(x, y, g, g, 1e-6, xb[:, 32:128], hb[:, 32:128])
    for buf in (xb, hb):
        assert not torch.isnan(buf[:, 32:128]).any()
        assert torch.isnan(buf[:, :32]).all() and torch.isnan(buf[:, 128:]).all()

    qkv = _rand(2, 7, 3 * 96, **bf)
    qb = _nan((4, 2, 7, 96), torch.bfloat16, device)
    qk_norm_launch(qkv, g, g, 1e-6, qb[1:3])
    assert not torch.isnan(qb[1:3]).any() and torch.isnan(qb[0]).all() and torch.isnan(qb[3]).all()


# --- the rounding promise, asserted as equality ------------------------------------------------
# The parity rule cannot see a kernel that stops rounding where upstream rounds (that makes it
# more accurate): where the README promises upstream's rounding points, bf16 and fp16 results
# must equal the module path's bit for bit. The inputs are small multiples of 1/8 (and gamma a
# power of two), so every sum in fp32 is exact in any order: what is compared is where each
# path rounds, not how it orders a reduction. (In the interpreter, whose bf16 cast rounds as
# the GPU's does.)

LOW = [torch.bfloat16, torch.float16]


def _dyadic(*shape, dtype, device, k=16):
    return (torch.randint(-k, k + 1, shape, device=device).float() / 8).to(dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("rows, n", [(7, 96), (37, 100), (13, 1000)])
def test_norms_equal_the_module_path_bit_for_bit(device, dtype, rows, n):
    x, y = _dyadic(rows, n, dtype=dtype, device=device), _dyadic(rows, n, dtype=dtype, device=device)
    w = _rand(n, dtype=dtype, device=device) + 1
    g = torch.full((n,), 0.25, dtype=dtype, device=device)
    norm = _rms_module(w)
    with torch.no_grad():
        ls = LayerScale(n, 1.0).to(device, dtype)
        ls.gamma.copy_(g)
        x_new = x + ls(y)
        assert torch.equal(rms_norm(x, w, 1e-6), norm(x)), "rms_norm"
        got_x, got_h = residual_rms_norm(x, y, g, w, 1e-6)
        assert torch.equal(got_x, x_new) and torch.equal(got_h, norm(x_new)), "residual_rms_norm"
        qkv = _dyadic(rows, 3 * n, dtype=dtype, device=device)
        wq, wk = _rand(n, dtype=dtype, device=device) + 1, _rand(n, dtype=dtype, device=device) + 1
        q, k, _ = qkv.split(n, dim=-1)
        assert torch.equal(qk_norm(qkv, wq, wk, 1e-6), torch.stack([_rms_module(wq)(q), _rms_module(wk)(k)]))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("gamma, norm, rowscale", [(True, True, False), (True, True, True), (False, True, False),
                                                  (True, False, True)])
def test_norm_backward_rounds_where_autograd_rounds(device, dtype, gamma, norm, rowscale):
    """The gradients of the stream, of y and of a plain norm's input equal autograd's through
    the module path bit for bit; the weight and gamma gradients (sums over rows, in another
    order) by the parity rule."""
    rows, n = 37, 96

    def leaf(t):
        return t.requires_grad_()
    x, y = leaf(_dyadic(rows, n, dtype=dtype, device=device)), leaf(_dyadic(rows, n, dtype=dtype, device=device))
    w = leaf(_dyadic(n, dtype=dtype, device=device) + 2) if norm else None
    g = leaf(torch.full((n,), 0.5, dtype=dtype, device=device)) if gamma else None
    s = (torch.rand(rows, device=device) > 0.3).to(dtype) * 2 if rowscale else None
    dxn, dh = _dyadic(rows, n, dtype=dtype, device=device), _dyadic(rows, n, dtype=dtype, device=device)
    x_new, h = residual_rms_norm(x, y, g, w, 1e-6, s)
    outs, grads = ((x_new, h), (dxn, dh)) if norm else ((x_new,), (dxn,))
    leaves = [t for t in (x, y, w, g) if t is not None]
    got = torch.autograd.grad(outs, leaves, grads)
    want = torch.autograd.grad([o for o in rms_norm_ref(x, w, 1e-6, y, g, s) if o is not None], leaves, grads)
    assert torch.equal(got[0], want[0]), "dx"
    assert torch.equal(got[1], want[1]), "dy"
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    by_name = dict(zip([n for n, t in (("x", x), ("y", y), ("w", w), ("g", g)) if t is not None], leaves64))
    want64 = torch.autograd.grad([o for o in rms_norm_ref(by_name["x"], by_name.get("w"), 1e-6, by_name["y"],
                                                          by_name.get("g"), None if s is None else s.double())
                                  if o is not None],
                                 leaves64, [t.double() for t in grads])
    for a, b, e in zip(got[2:], want[2:], want64[2:]):
        assert_parity(a, e, b, atol=1e-3)
    xp = leaf(_dyadic(rows, n, dtype=dtype, device=device))
    wp = leaf(_dyadic(n, dtype=dtype, device=device) + 2)
    (dx_kernel,) = torch.autograd.grad(rms_norm(xp, wp, 1e-6), [xp], dh)
    (dx_module,) = torch.autograd.grad(_rms_module(wp)(xp), [xp], dh)
    assert torch.equal(dx_kernel, dx_module), "the plain norm's input gradient"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch's GPU GELU is the reference (on CPU "
                    "the compile gate's same-bits check compares the compiled GELU with one on CUDA's libdevice erff)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gelu_equals_torch_cuda_for_every_input_of_the_dtype(dtype):
    """The GELU kernel and fc1's GELU epilogue (through an identity weight, so h is the input)
    give F.gelu's output bit for bit for all 65,536 bit patterns of the dtype (the finite
    ones): the epilogue rounds fc1's output to the dtype first, so this is exhaustive."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
    xs = torch.where(torch.isfinite(bits), bits, torch.zeros_like(bits)).contiguous()
    want = F.gelu(xs)
    got = gelu_launch(xs, torch.full_like(xs, float("nan")))
    a = xs.view(256, 256)
    fused = linear_launch(a, torch.eye(256, dtype=dtype, device="cuda"), None, torch.full_like(a, float("nan")),
                          "gelu").view(-1)
    for name, y in (("gelu kernel", got), ("fc1 epilogue", fused)):
        bad = (y.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
        assert bad.numel() == 0, f"{name}: {bad.numel()} inputs differ, e.g. {xs[bad[:5]].tolist()}: " \
                                 f"{y[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"
