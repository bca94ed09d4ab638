"""InternViT6B(fast=True) against fast=False with the same weights, and the switch's rules."""
import warnings

import pytest
import torch

import internvit_fast.fast_path as fast_path
from helpers import assert_parity, small_model

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _pair(dtype, **kw):
    naive = small_model(dtype=dtype, **kw)
    fast = small_model(dtype=dtype, fast=True, **kw)
    fast.load_state_dict(naive.state_dict())
    ref64 = small_model(dtype=torch.float32, **kw).double()
    ref64.load_state_dict(naive.state_dict())
    return naive, fast, ref64


def _spy(monkeypatch):
    calls = []
    real = fast_path.forward_blocks
    monkeypatch.setattr(fast_path, "forward_blocks", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [
    dict(out_indices=[0, 1, 2, 3]),
    dict(out_indices=[0, 1, 2, 3], with_fpn=True, with_final_norm=True),
    dict(out_indices=[1, 3], layerscale_force_fp32=True),
    dict(out_indices=[2], use_flash_attn=False, qkv_bias=True),
    dict(out_indices=[3], init_values=None, qk_normalization=False),
], ids=["all-outs", "fpn", "ls-fp32", "naive-attn", "no-ls-no-qknorm"])
def test_fast_matches_naive(device, dtype, kw, monkeypatch):
    naive, fast, ref64 = (m.to(device) for m in _pair(dtype, **kw))
    img = torch.randn(2, 3, 56, 42, device=device)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got, base, exact = fast(img), naive(img), ref64(img.double())
    assert calls == [1], "fast path did not run the kernels"
    assert len(got) == len(base)
    for i, (g, b, e) in enumerate(zip(got, base, exact)):
        assert g.shape == b.shape and g.dtype == torch.float32
        assert_parity(g, e, b, atol=1e-4, what=f"output {i}")


def test_fast_inference_mode_and_frozen_training_run_kernels(device, monkeypatch):
    naive, fast, _ = _pair(torch.bfloat16, freeze_vit=True, with_fpn=True, out_indices=[0, 1, 2, 3])
    fast, naive = fast.to(device), naive.to(device)
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device)
    with torch.inference_mode():
        fast(img)
    fast.train()  # frozen ViT, input without grad: the kernels run, the FPN still trains
    outs = fast(img)
    assert calls == [1, 1]
    sum(o.sum() for o in outs).backward()
    assert fast.up1[0].weight.grad is not None and fast.blocks[0].attn.qkv.weight.grad is None


def _train_grads(model, img, grad_out, seed):
    """One forward and backward; the gradients of every parameter and of the image."""
    torch.manual_seed(seed)  # drop path draws the same scales in every model
    img = img.clone().requires_grad_()
    outs = model(img)
    sum((o * g).sum() for o, g in zip(outs, grad_out)).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["image"] = img.grad.clone()
    model.zero_grad()
    return outs, grads


TRAIN_CASES = {
    "plain": dict(out_indices=[1, 3]),
    "cp": dict(out_indices=[1, 3], with_cp=True),
    "drop-path": dict(out_indices=[0, 1, 2, 3], drop_path_rate=0.4, with_fpn=True),
    "drop-path-cp": dict(out_indices=[3], drop_path_rate=0.4, with_cp=True),
    "variants": dict(out_indices=[3], qkv_bias=True, layerscale_force_fp32=True, use_flash_attn=False),
    "no-ls-no-qknorm": dict(out_indices=[2], init_values=None, qk_normalization=False),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_through_the_kernels_gives_the_reference_gradients_fp32(device, monkeypatch, case):
    naive, fast, ref64 = _pair(torch.float32, **TRAIN_CASES[case])
    naive, fast, ref64 = naive.to(device).train(), fast.to(device).train(), ref64.to(device).train()
    calls = _spy(monkeypatch)
    img = torch.randn(2, 3, 56, 42, device=device)
    with torch.no_grad():
        grad_out = [torch.randn_like(o) for o in naive(img)]
    out_f, got = _train_grads(fast, img, grad_out, seed=5)
    assert calls == [1], "the fast path did not run the kernels"
    out_n, want = _train_grads(naive, img, grad_out, seed=5)
    for a, b in zip(out_f, out_n):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) > 20
    exact = None
    for name in want:  # fp32: equal up to the order of the sums (the weight gradients' partial sums)
        scale = want[name].abs().max().item()
        if torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale + 1e-8):
            continue
        # A sum that cancels (drop path zeroes whole rows; the reference's own fp32 error, which
        # depends on the CPU's SDPA kernels, is then of that size too): the parity rule against
        # float64, with the reference path's fp32 error as the allowance.
        if exact is None:
            _, exact = _train_grads(ref64, img.double(), [g.double() for g in grad_out], seed=5)
        assert_parity(got[name], exact[name], want[name], atol=1e-5 * scale + 1e-8, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain", "cp", "variants"])
def test_training_gradients_low_precision_by_the_parity_rule(device, dtype, case):
    naive, fast, ref64 = _pair(dtype, **TRAIN_CASES[case])
    naive, fast, ref64 = naive.to(device).train(), fast.to(device).train(), ref64.to(device).train()
    img = torch.randn(2, 3, 56, 42, device=device)
    with torch.no_grad():
        grad_out = [torch.randn_like(o) for o in naive(img)]
    _, got = _train_grads(fast, img, grad_out, seed=5)
    _, base = _train_grads(naive, img, grad_out, seed=5)
    _, exact = _train_grads(ref64, img.double(), [g.double() for g in grad_out], seed=5)
    for name in exact:
        scale = exact[name].abs().max().item()
        assert_parity(got[name], exact[name], base[name], atol=1e-3 * scale + 1e-6, what=name)


def test_frozen_vit_trains_the_fpn_through_the_inference_kernels(device, monkeypatch):
    from internvit_fast.kernels import block_ops as linear
    naive, fast, _ = _pair(torch.float32, freeze_vit=True, with_fpn=True, out_indices=[0, 1, 2, 3])
    fast = fast.to(device).train()
    used = []
    monkeypatch.setattr(linear, "gelu_fused", lambda *a, _r=linear.gelu_fused, **k: used.append(1) or _r(*a, **k))
    outs = fast(torch.randn(1, 3, 56, 56, device=device))
    sum(o.sum() for o in outs).backward()
    assert used, "a frozen ViT needs no gradient: the inference kernels (fused epilogues) run"
    assert fast.up1[0].weight.grad is not None and fast.blocks[0].attn.qkv.weight.grad is None


@pytest.mark.parametrize("with_cp", [False, True])
def test_fast_path_saves_no_more_for_backward_than_the_reference(with_cp):
    """504x504 at batch 2 (2 x 1297 tokens), full width, one block, bf16: the bytes of the
    tensors autograd keeps for the backward, counted with fake tensors (no memory used). With
    with_cp only the block's input is kept; the recomputed block then keeps what it keeps
    without it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from internvit_fast.model import Block

    def saved(fast, drop):
        sizes = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):  # weights are not activation memory
                sizes.append(t.numel() * t.element_size())
            return t
        default = torch.get_default_dtype()
        with FakeTensorMode():
            torch.set_default_dtype(torch.bfloat16)
            try:
                blk = Block(3200, 25, 4, False, 0.1, drop, True, with_cp, True, False).train()
            finally:
                torch.set_default_dtype(default)
            x = torch.randn(2, 1297, 3200, dtype=torch.bfloat16, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fast_path.forward_blocks([blk], x, [0]) if fast else blk(x)
        return sum(sizes)

    for drop in (0.0, 0.4):
        ref, ours = saved(False, drop), saved(True, drop)
        assert ours <= ref, (drop, ours, ref)
        if with_cp:
            assert ours == ref == 2 * 1297 * 3200 * 2  # the block's input alone
        else:
            assert ours < 0.6 * ref  # no fp32 copies of norm inputs, no GELU output kept


def test_fast_model_in_float64_runs_reference(device, monkeypatch):
    naive, fast, _ = _pair(torch.float32, out_indices=[1])
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device, dtype=torch.float64)
    with torch.no_grad():
        a, b = fast.double().to(device)(img), naive.double().to(device)(img)
    assert calls == [] and torch.equal(a[0], b[0])


def test_fast_on_cpu_without_interpreter_warns_once_and_runs_reference(monkeypatch):
    naive, fast, _ = _pair(torch.bfloat16)
    monkeypatch.setattr(fast_path, "kernels_can_run_on", lambda device: False)
    monkeypatch.setattr(fast_path, "_warned_cpu", False)
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = fast(img)
        fast(img)
    assert calls == []
    assert len([w for w in seen if "Triton kernels need CUDA" in str(w.message)]) == 1
    with torch.no_grad():
        for x, y in zip(a, naive(img)):
            assert torch.equal(x, y)


@pytest.mark.slow
def test_fast_model_compiles_without_graph_breaks(device):
    _, fast, _ = _pair(torch.bfloat16, out_indices=[1, 3])
    fast.to(device)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    for size in [(56, 56), (42, 70)]:  # the model's grid, and a resized position table
        img = torch.randn(1, 3, *size, device=device)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                got, want = compiled(img), fast(img)
            for g, w in zip(got, want):
                assert torch.equal(g, w)


def test_fp32_model_under_bf16_autocast_gives_the_reference_result(device, monkeypatch):
    """AMP head tuning: a frozen fp32 ViT under bf16 autocast. The kernels take one dtype,
    autocast mixes two: the fast model runs the reference ops and gives their result."""
    naive, fast, _ = _pair(torch.float32, freeze_vit=True, out_indices=[1, 3])
    naive, fast = naive.to(device), fast.to(device)
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        got, want = fast(img), naive(img)
    assert calls == []
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_bf16_model_under_bf16_autocast_runs_the_kernels(device, monkeypatch):
    naive, fast, ref64 = _pair(torch.bfloat16, out_indices=[1, 3])
    naive, fast, ref64 = naive.to(device), fast.to(device), ref64.to(device)
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        got, base = fast(img), naive(img)
    assert calls == [1]
    with torch.no_grad():
        exact = ref64(img.double())
    for g, b, e in zip(got, base, exact):
        assert_parity(g, e, b, atol=1e-4)


@pytest.mark.slow
def test_fast_model_trains_under_torch_compile_without_graph_breaks(device):
    naive, fast, _ = _pair(torch.float32, out_indices=[1, 3], drop_path_rate=0.3, with_cp=True)
    fast.to(device).train()
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    img = torch.randn(1, 3, 42, 56, device=device)
    with torch.no_grad():
        grad_out = [torch.randn_like(o) for o in fast(img)]
    _, got = _train_grads(compiled, img, grad_out, seed=3)
    _, want = _train_grads(fast, img, grad_out, seed=3)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * scale + 1e-8, msg=name)
