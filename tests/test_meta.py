"""The low-memory path: build on the meta device (no memory, no initialisation), then load.

    with torch.device("meta"):
        model = InternViT6B(...)
    load_checkpoint(model, path, device="cuda")        # or model.load_state_dict(sd, assign=True)

Each test compares with the ordinary path (built, initialised, loaded): the same outputs,
bit for bit, in bf16 and in FP8; and a meta model that is not (wholly) loaded refuses to
run, before any kernel, with a message that says so."""
import pytest
import torch

import internvit_fast.fast_path as fast_path
from helpers import SMALL, small_model
from internvit_fast import InternViT6B, load_checkpoint
from internvit_fast.checkpoint import CheckpointError


def _meta(**kw) -> InternViT6B:
    with torch.device("meta"):
        return InternViT6B(**dict(SMALL, **kw))


def _state(tmp_path, **kw):
    """An ordinary model with random weights, saved."""
    src = small_model(**kw)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    return src, tmp_path / "w.pth"


def _no_meta(model):
    assert not [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]


def test_the_6b_model_builds_on_the_meta_device():
    with torch.device("meta"):
        model = InternViT6B(img_size=504, out_indices=[11, 23, 35, 47], with_fpn=True, drop_path_rate=0.4)
    n = sum(p.numel() for p in model.parameters())
    assert 5.9e9 < n < 6.1e9 and all(p.is_meta for p in model.parameters())
    assert abs(model.blocks[-1].drop_path1.drop_prob - 0.4) < 1e-6  # the schedule is still computed (on the CPU)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_meta_build_and_load_checkpoint_give_the_ordinary_outputs(tmp_path, precision):
    src, path = _state(tmp_path, with_fpn=True, out_indices=[0, 1, 2, 3])
    ordinary = small_model(with_fpn=True, out_indices=[0, 1, 2, 3], precision=precision)
    load_checkpoint(ordinary, path)
    model = _meta(with_fpn=True, out_indices=[0, 1, 2, 3], precision=precision)
    load_checkpoint(model, path, device="cpu")
    _no_meta(model)
    assert model.precision == precision
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(model.eval()(img), ordinary.eval()(img)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_meta_build_and_load_state_dict_assign_give_the_ordinary_outputs(tmp_path, precision):
    src, _ = _state(tmp_path)
    ordinary = small_model(precision=precision)
    ordinary.load_state_dict(src.state_dict())
    model = _meta(precision=precision)
    model.load_state_dict(src.state_dict(), assign=True)
    _no_meta(model)
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(model.eval()(img), ordinary.eval()(img)):
            assert torch.equal(a, b)


def test_the_fast_path_of_a_meta_built_model_matches_its_reference(tmp_path):
    _, path = _state(tmp_path)
    model = _meta(fast=True)
    load_checkpoint(model, path)
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        fast = model.eval()(img)
        model.fast = False
        ref = model(img)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_vit_file_without_the_fpn_initialises_a_meta_models_fpn(tmp_path):
    src = small_model(out_indices=[0, 1, 2, 3])
    torch.save(src.state_dict(), tmp_path / "vit.pth")  # no up1..up4: a pretrained ViT file
    model = _meta(with_fpn=True, out_indices=[0, 1, 2, 3])
    missing, _ = load_checkpoint(model, tmp_path / "vit.pth")
    assert missing and all(k.startswith("up") for k in missing)
    _no_meta(model)
    w = model.up1[0].weight.float()
    fan_out = 2 * 2 * w.shape[1]
    assert torch.isfinite(w).all() and abs(w.std().item() / (2.0 / fan_out) ** 0.5 - 1) < 0.1  # upstream's init
    assert torch.equal(model.up1[0].bias, torch.zeros_like(model.up1[0].bias))
    assert torch.equal(model.up1[1].weight, torch.ones_like(model.up1[1].weight))
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model.eval()(torch.randn(1, 3, 56, 56)))


def test_a_meta_model_run_before_loading_says_so_before_any_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_path, "forward_blocks", lambda *a: calls.append(1))
    model = _meta(fast=True)
    for img in (torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56, device="meta")):
        with pytest.raises(ValueError, match="meta device.*load_checkpoint"):
            model(img)
    assert calls == []


def test_a_partly_loaded_meta_model_names_what_is_missing(tmp_path):
    src, _ = _state(tmp_path)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.3.")}
    model = _meta()
    model.load_state_dict(sd, assign=True, strict=False)
    with pytest.raises(ValueError, match=r"blocks\.3\."):
        model(torch.randn(1, 3, 56, 56))
    model.load_state_dict({k: v for k, v in src.state_dict().items() if k.startswith("blocks.3.")}, assign=True,
                          strict=False)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 56, 56))  # whole now: it runs


def test_a_model_moved_to_meta_is_checked_again():
    model = small_model()
    with torch.no_grad():
        model(torch.randn(1, 3, 56, 56))
    model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        model(torch.randn(1, 3, 56, 56, device="meta"))


def test_a_file_that_would_leave_meta_tensors_is_refused_before_anything_is_created(tmp_path):
    src, _ = _state(tmp_path)
    torch.save({k: v for k, v in src.state_dict().items() if k != "blocks.2.mlp.fc1.weight"}, tmp_path / "part.pth")
    model = _meta()
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_checkpoint(model, tmp_path / "part.pth", strict=False)
    assert all(t.is_meta for t in model.state_dict().values())
