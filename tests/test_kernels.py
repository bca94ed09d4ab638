"""Each Triton kernel against its float64 reference and the naive module path.

Outputs are poisoned with NaN before each launch, so an unwritten element fails.
Low precision is judged by the framework's own error (helpers.assert_parity).
Without CUDA the kernels run in Triton's interpreter (conftest.py).
"""
import pytest
import torch

from helpers import assert_parity
from internvit_fast.kernels import (gelu_linear, gelu_linear_launch, gelu_linear_ref, qk_norm, qk_norm_launch,
                                    qk_norm_ref, residual_rms_norm, residual_rms_norm_launch,
                                    residual_rms_norm_ref, rms_norm, rms_norm_launch, rms_norm_ref)
from internvit_fast.model import LayerScale, Mlp, RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, width): one row, primes, the 504px token count; 64/96, non-powers of two, 3200.
NORM_CASES = [(1, 64), (7, 96), (37, 100), (13, 1000), (1297, 96), (31, 3200), (1297, 3200)]


def _rand(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _strided(rows, n, dtype, device):
    """A (rows, n) view whose rows are further apart than n (a slice of a wider buffer)."""
    return _rand(rows, n + 37, dtype=dtype, device=device, scale=2.0)[:, 5:5 + n]


def _rms_module(weight):
    m = RMSNorm(weight.shape[0]).to(weight.device, weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
    return m


# --- RMSNorm ----------------------------------------------------------------------------

# Strided rows at the smaller sizes (the interpreter runs programs one by one).
RMS_CASES = [(r, n, False) for r, n in NORM_CASES] + [(r, n, True) for r, n in NORM_CASES if r * n <= 100_000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, strided", RMS_CASES)
def test_rms_norm(device, dtype, rows, n, strided):
    x = _strided(rows, n, dtype, device) if strided else _rand(rows, n, dtype=dtype, device=device, scale=2.0)
    w = _rand(n, dtype=dtype, device=device) + 1
    out = _nan((rows, n), dtype, device)
    rms_norm_launch(x, w, 1e-6, out)
    ref64 = rms_norm_ref(x.double(), w.double())
    with torch.no_grad():
        naive = _rms_module(w)(x)
    assert_parity(out, ref64, naive, what=f"rms_norm {dtype} {rows}x{n}")


def test_rms_norm_op_keeps_leading_dims_and_untouched_padding(device):
    buf = _rand(2, 5, 160, dtype=torch.bfloat16, device=device)
    x = buf[..., :96]  # strided rows inside a 3-D tensor
    w = _rand(96, dtype=torch.bfloat16, device=device)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape
    assert_parity(y, rms_norm_ref(x.double(), w.double()), rms_norm_ref(x, w))
    out = _nan((2, 5, 160), torch.bfloat16, device)
    rms_norm_launch(x, w, 1e-6, out[..., :96])
    assert torch.isnan(out[..., 96:]).all(), "kernel wrote outside its rows"


# --- QK-norm --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, c", [(1, 64), (7, 96), (37, 100), (1297, 96), (13, 3200)])
@pytest.mark.parametrize("normalize", [True, False])
def test_qk_norm(device, dtype, rows, c, normalize):
    B = 1 if rows in (1, 7, 13) else (rows if rows < 100 else 1)
    qkv = _rand(B, rows // B, 3 * c, dtype=dtype, device=device, scale=2.0)
    wq, wk = (_rand(c, dtype=dtype, device=device) + 1 for _ in range(2))
    if not normalize:
        wq = wk = None
    out = _nan((3, B, rows // B, c), dtype, device)
    qk_norm_launch(qkv, wq, wk, 1e-6, out)
    ref64 = qk_norm_ref(qkv.double(), *(None if w is None else w.double() for w in (wq, wk)))
    q, k, v = qkv.split(c, dim=-1)
    with torch.no_grad():  # the naive path: Attention's q_norm/k_norm modules
        naive = torch.stack([_rms_module(wq)(q), _rms_module(wk)(k), v]) if normalize else torch.stack([q, k, v])
    assert_parity(out, ref64, naive, what=f"qk_norm {dtype} {rows}x{c}")
    assert torch.equal(out[2], v), "v must be copied bit for bit"


def test_qk_norm_strided_rows_and_attention_layout(device):
    c, heads = 96, 3
    qkv = _rand(2, 9, 3 * c + 40, dtype=torch.bfloat16, device=device)[..., 20:20 + 3 * c]
    wq, wk = _rand(c, dtype=torch.bfloat16, device=device), _rand(c, dtype=torch.bfloat16, device=device)
    out = qk_norm(qkv, wq, wk, 1e-6)
    assert out.shape == (3, 2, 9, c) and out.is_contiguous()
    assert_parity(out, qk_norm_ref(qkv.double(), wq.double(), wk.double()), qk_norm_ref(qkv, wq, wk))
    q = out[0].view(2, 9, heads, c // heads).transpose(1, 2)  # what attention receives: a view
    assert q.data_ptr() == out.data_ptr() and q.stride(-1) == 1


# --- residual + LayerScale + RMSNorm ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(1, 64), (7, 96), (37, 100), (1297, 96), (31, 3200)])
@pytest.mark.parametrize("gamma, norm, force_fp32", [
    (True, True, False), (True, True, True), (False, True, False), (True, False, False), (False, False, False)])
def test_residual_rms_norm(device, dtype, rows, n, gamma, norm, force_fp32):
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
        h_naive = _rms_module(w)(x_naive) if norm else None
    x64, h64 = residual_rms_norm_ref(x.double(), y.double(), None if g is None else g.double(),
                                     None if w is None else w.double())
    assert_parity(x_out, x64, x_naive, what="x_new")
    if dtype != torch.float32:  # rounding points match upstream's: same bits
        assert torch.equal(x_out, x_naive)
    if norm:
        # h is judged against the float64 norm of the *kernel's* x_new (both paths round x_new
        # first); the naive path's error is measured the same way.
        h_ref = rms_norm_ref(x_naive.double(), w.double())
        assert_parity(h_out, h_ref, h_naive, what="h")


def test_residual_rms_norm_op_without_norm_returns_empty(device):
    x = _rand(3, 96, dtype=torch.bfloat16, device=device)
    y = _rand(3, 96, dtype=torch.bfloat16, device=device)
    x_new, h = residual_rms_norm(x, y, None, None, 1e-6)
    assert h.numel() == 0 and torch.equal(x_new, x + y)


# --- GELU-MLP GEMM -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", [(1, 64, 96), (37, 96, 384), (13, 100, 200), (1297, 96, 384), (5, 3200, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_linear(device, dtype, m, k, n, bias):
    a = _rand(m, k, dtype=dtype, device=device)
    w = _rand(n, k, dtype=dtype, device=device, scale=k ** -0.5 * 2)
    b = _rand(n, dtype=dtype, device=device, scale=0.5) if bias else None
    out = _nan((m, n), dtype, device)
    gelu_linear_launch(a, w, b, out)
    with torch.no_grad():  # the naive path: Mlp.fc1 then nn.GELU
        mlp = Mlp(k, n).to(device, dtype)
        mlp.fc1.weight.copy_(w)
        mlp.fc1.bias.copy_(b) if bias else mlp.fc1.bias.zero_()
        naive = mlp.act(mlp.fc1(a))
    ref64 = gelu_linear_ref(a.double(), w.double(), None if b is None else b.double())
    assert_parity(out, ref64, naive, atol=1e-4 if dtype == torch.float32 else 1e-3,
                  what=f"gelu_linear {dtype} {m}x{k}x{n}")


def test_gelu_linear_strided_rows_and_leading_dims(device):
    a = _rand(2, 7, 160, dtype=torch.bfloat16, device=device)[..., 10:106]
    w = _rand(200, 96, dtype=torch.bfloat16, device=device, scale=0.2)
    b = _rand(200, dtype=torch.bfloat16, device=device)
    y = gelu_linear(a, w, b)
    assert y.shape == (2, 7, 200)
    assert_parity(y, gelu_linear_ref(a.double(), w.double(), b.double()), gelu_linear_ref(a, w, b), atol=1e-3)
    a2 = _rand(9, 160, dtype=torch.bfloat16, device=device)[:, :96]  # 2-D strided rows, launched directly
    out = _nan((9, 200), torch.bfloat16, device)
    gelu_linear_launch(a2, w, b, out)
    assert_parity(out, gelu_linear_ref(a2.double(), w.double(), b.double()), gelu_linear_ref(a2, w, b), atol=1e-3)


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
        qk_norm(_rand(2, 95, **bf), None, None)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        qk_norm(_rand(2, 3 * 96, **bf), w[:10], w[:10])
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        qk_norm(_rand(2, 3 * 96, **bf), w, None)
    with pytest.raises(ValueError, match="y is \\(4, 95\\)"):
        residual_rms_norm(x, _rand(4, 95, **bf), None, w)
    with pytest.raises(ValueError, match="gamma must have shape"):
        residual_rms_norm(x, x, w[:3], w)
    with pytest.raises(ValueError, match="a must be 2-D \\(M, 96\\)"):
        gelu_linear_launch(_rand(4, 95, **bf), _rand(8, 96, **bf), None, _nan((4, 8), torch.bfloat16, device))
    with pytest.raises(ValueError, match="weight dtype torch.float32 differs"):
        gelu_linear(x, _rand(8, 96, dtype=torch.float32, device=device), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        gelu_linear(x, _rand(8, 96, **bf), _rand(7, **bf))


def test_kernels_are_torch_custom_ops():
    for name in ("rms_norm", "qk_norm", "residual_rms_norm", "gelu_linear"):
        assert hasattr(torch.ops.internvit_fast, name), name


def test_kernels_write_only_inside_their_outputs(device):
    """Outputs that are windows of larger NaN buffers: everything outside stays NaN."""
    bf = dict(dtype=torch.bfloat16, device=device)
    a, w, b = _rand(37, 96, **bf), _rand(200, 96, **bf, scale=0.2), _rand(200, **bf)
    big = _nan((37, 300), torch.bfloat16, device)
    gelu_linear_launch(a, w, b, big[:, 50:250])
    assert not torch.isnan(big[:, 50:250]).any()
    assert torch.isnan(big[:, :50]).all() and torch.isnan(big[:, 250:]).all()

    x, y, g = _rand(13, 96, **bf), _rand(13, 96, **bf), _rand(96, **bf)
    xb, hb = _nan((13, 160), torch.bfloat16, device), _nan((13, 160), torch.bfloat16, device)
    residual_rms_norm_launch(x, y, g, g, 1e-6, xb[:, 32:128], hb[:, 32:128])
    for buf in (xb, hb):
        assert not torch.isnan(buf[:, 32:128]).any()
        assert torch.isnan(buf[:, :32]).all() and torch.isnan(buf[:, 128:]).all()

    qkv = _rand(2, 7, 3 * 96, **bf)
    qb = _nan((5, 2, 7, 96), torch.bfloat16, device)
    qk_norm_launch(qkv, g, g, 1e-6, qb[1:4])
    assert not torch.isnan(qb[1:4]).any() and torch.isnan(qb[0]).all() and torch.isnan(qb[4]).all()
