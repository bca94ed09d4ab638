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


@pytest.mark.parametrize("dtype", DTYPES)
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


def test_fast_with_grad_uses_reference_and_gives_its_gradients(device, monkeypatch):
    naive, fast, _ = _pair(torch.float32, out_indices=[1, 3])
    naive, fast = naive.to(device), fast.to(device)
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device)
    for m in (naive, fast):
        sum(o.square().sum() for o in m(img)).backward()
    assert calls == []
    for (name, a), b in zip(naive.named_parameters(), fast.parameters()):
        # The same reference ops: equal up to the non-determinism of some CUDA backward kernels.
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fast_model_in_float64_runs_reference(device, monkeypatch):
    naive, fast, _ = _pair(torch.float32, out_indices=[1])
    calls = _spy(monkeypatch)
    img = torch.randn(1, 3, 56, 56, device=device, dtype=torch.float64)
    with torch.no_grad():
        a, b = fast.double().to(device)(img), naive.double().to(device)(img)
    assert calls == [] and torch.equal(a[0], b[0])


def test_fast_with_active_drop_path_uses_reference(device, monkeypatch):
    _, fast, _ = _pair(torch.float32, drop_path_rate=0.5, out_indices=[3])
    fast.to(device).train()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fast(torch.randn(2, 3, 56, 56, device=device))
    assert calls == []


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
