"""The reference model against an independent statement of upstream's math, and its behaviour."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import SMALL, small_model
from internvit_fast import InternViT6B


def block_math(sd, i, x, heads, force_fp32=False, eps=1e-6):
    """One block written out from the architecture, from state_dict tensors alone."""
    p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731

    def rms(t, w):
        h = t.float()
        return w * (h / torch.sqrt(h.square().mean(-1, keepdim=True) + eps)).to(t.dtype)

    def ls(t, name):
        g = sd.get(f"blocks.{i}.{name}.gamma")  # absent when init_values is falsy
        if g is None:
            return t
        return (t.float() * g.float()).to(t.dtype) if force_fp32 else t * g

    B, N, C = x.shape
    D = C // heads
    qkv = x_n = rms(x, p("norm1.weight"))
    qkv = x_n @ p("attn.qkv.weight").t()
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k = rms(q, p("attn.q_norm.weight")), rms(k, p("attn.k_norm.weight"))
    q, k, v = (t.reshape(B, N, heads, D).permute(0, 2, 1, 3) for t in (q, k, v))
    a = torch.softmax((q * D ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
    a = a.permute(0, 2, 1, 3).reshape(B, N, C) @ p("attn.proj.weight").t() + p("attn.proj.bias")
    x = x + ls(a, "ls1")
    h = rms(x, p("norm2.weight")) @ p("mlp.fc1.weight").t() + p("mlp.fc1.bias")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    m = h @ p("mlp.fc2.weight").t() + p("mlp.fc2.bias")
    return x + ls(m, "ls2")


def model_math(model, img, heads):
    sd = {k: v for k, v in model.state_dict().items()}
    x = F.conv2d(img.to(model.dtype), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    B, C, H, W = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    outs = []
    for i in range(max(model.out_indices) + 1):
        x = block_math(sd, i, x, heads, getattr(model.blocks[0].ls1, "force_fp32", False))
        if i in model.out_indices:
            outs.append(x[:, 1:].transpose(1, 2).reshape(B, C, H, W).float())
    return outs


@pytest.mark.parametrize("use_flash_attn", [False, True])
@pytest.mark.parametrize("force_fp32", [False, True])
def test_matches_written_out_math_fp32(use_flash_attn, force_fp32):
    m = small_model(dtype=torch.float32, use_flash_attn=use_flash_attn, layerscale_force_fp32=force_fp32,
                    out_indices=[0, 2, 3])
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got, want = m(img), model_math(m, img, 3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_matches_written_out_math_bf16():
    m = small_model(out_indices=[1, 3])
    assert m.dtype == torch.bfloat16  # upstream's default cast
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = m(img)
        want = model_math(m, img, 3)
        m64 = small_model(dtype=torch.float32, out_indices=[1, 3])
        m64.load_state_dict(m.state_dict())
        exact = model_math(m64.double(), img.double(), 3)
    for g, w, e in zip(got, want, exact):
        assert g.dtype == torch.float32
        # Naive and written-out bf16 paths round at the same points: bf16-level agreement,
        # and both stay as close to the float64 statement as each other.
        torch.testing.assert_close(g, w, rtol=2e-2, atol=5e-2)
        assert (g.double() - e).abs().max() <= 2 * (w.double() - e).abs().max() + 1e-3


def test_sdpa_and_naive_attention_agree():
    m = small_model(dtype=torch.float32, use_flash_attn=True)
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = m(img)
        for blk in m.blocks:
            blk.attn.use_flash_attn = False
        b = m(img)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_a_cudnn_attention_failure_falls_back_to_torchs_order_once(monkeypatch):
    """cuDNN attention that accepts inputs and then fails at run time (pytorch#140930): the
    first failure warns and later calls run in torch's own order; any other failure (another
    backend's, out of memory) is raised as it is. (On a CPU: cuDNN-first and the backend
    choice stood in for.)"""
    from internvit_fast import attention
    monkeypatch.setattr(attention, "CUDNN_FAILED", [])
    monkeypatch.setattr(attention, "cudnn_first", lambda q: not attention.CUDNN_FAILED)
    backend = ["cudnn_attention"]
    monkeypatch.setattr(attention, "sdpa_backend", lambda q, k, v, scale: backend[0])
    real, calls = F.scaled_dot_product_attention, []
    error = [RuntimeError("cuDNN Frontend error: No execution plans support the graph.")]

    def sdpa(q, k, v, scale=None):
        calls.append("cudnn first" if attention.cudnn_first(q) else "torch's order")
        if calls[-1] == "cudnn first":
            raise error[0]
        return real(q, k, v, scale=scale)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", sdpa)
    q, k, v = (torch.randn(2, 3, 17, 16) for _ in range(3))
    want = attention.naive_attention(q, k, v, 0.25)
    with pytest.warns(RuntimeWarning, match="cuDNN attention failed .*No execution plans"):
        torch.testing.assert_close(attention.attend(q, k, v, 0.25, True), want)
    assert len(attention.CUDNN_FAILED) == 1
    torch.testing.assert_close(attention.attend(q, k, v, 0.25, True), want)
    assert calls == ["cudnn first", "torch's order", "torch's order"]
    for what, err in (("flash_attention", RuntimeError("flash failed")),
                      ("cudnn_attention", torch.OutOfMemoryError("out of memory")),
                      ("cudnn_attention", RuntimeError("CUDA error: an illegal memory access was encountered"))):
        attention.CUDNN_FAILED.clear()
        backend[0], error[0] = what, err
        with pytest.raises(type(err), match=str(err)):
            attention.attend(q, k, v, 0.25, True)
        assert attention.CUDNN_FAILED == []


def test_cudnn_is_asked_first_on_sm90_until_it_fails(monkeypatch):
    """The real switch: cuDNN first for a CUDA tensor on sm_90, torch's own order after a
    recorded failure (and on other cards)."""
    import types
    from internvit_fast import attention
    monkeypatch.setattr(attention, "CUDNN_FAILED", [])
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap[0])
    q = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    assert attention.cudnn_first(q) and not isinstance(attention.sdpa_priority(q), contextlib.nullcontext)
    attention.CUDNN_FAILED.append("RuntimeError: cuDNN Frontend error")
    assert not attention.cudnn_first(q) and isinstance(attention.sdpa_priority(q), contextlib.nullcontext)
    attention.CUDNN_FAILED.clear()
    cap[0] = (8, 0)
    assert not attention.cudnn_first(q)


def test_feature_shapes_and_dtypes_without_fpn():
    m = small_model(out_indices=[0, 3])
    outs = m(torch.randn(2, 3, 56, 84))
    assert [tuple(o.shape) for o in outs] == [(2, 96, 4, 6)] * 2
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in outs)


@pytest.mark.parametrize("final_norm", [False, True])
def test_fpn_shapes_and_dtypes(final_norm):
    m = small_model(with_fpn=True, with_final_norm=final_norm, out_indices=[0, 1, 2, 3])
    outs = m(torch.randn(2, 3, 112, 56))
    assert [tuple(o.shape) for o in outs] == [(2, 96, 32, 16), (2, 96, 16, 8), (2, 96, 8, 4), (2, 96, 4, 2)]
    assert all(o.dtype == torch.float32 and o.is_contiguous() and torch.isfinite(o).all() for o in outs)
    keys = set(m.state_dict())
    assert {"up1.0.weight", "up1.1.weight", "up1.3.weight", "up2.0.weight"} <= keys
    assert ("up1.4.weight" in keys) == final_norm and ("up4.1.bias" in keys) == final_norm


def test_state_dict_keys_are_upstreams():
    keys = set(small_model(with_fpn=True, out_indices=[0, 1, 2, 3], qkv_bias=True).state_dict())
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
              "blocks.3.norm1.weight", "blocks.3.attn.qkv.weight", "blocks.3.attn.qkv.bias",
              "blocks.3.attn.q_norm.weight", "blocks.3.attn.k_norm.weight", "blocks.3.attn.proj.weight",
              "blocks.3.attn.proj.bias", "blocks.3.ls1.gamma", "blocks.3.norm2.weight",
              "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc1.bias", "blocks.3.mlp.fc2.weight",
              "blocks.3.mlp.fc2.bias", "blocks.3.ls2.gamma"]:
        assert k in keys, k
    assert set(small_model(fast=True).state_dict()) == set(small_model().state_dict())


def test_no_layerscale_when_init_values_falsy():
    m = small_model(init_values=None, dtype=torch.float32, out_indices=[1])
    assert not any("gamma" in k for k in m.state_dict())
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        got, want = m(img), model_math(m, img, 3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_position_table_resized_for_other_sizes():
    m = small_model(dtype=torch.float32, out_indices=[0])
    assert m.pos_embed_for((4, 4)) is m.pos_embed  # at img_size: the loaded table, unchanged
    with torch.no_grad():
        t1 = m.pos_embed_for((3, 5))
        g = m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        want = F.interpolate(g, size=(3, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(t1[:, 1:], want)
        torch.testing.assert_close(t1[:, :1], m.pos_embed[:, :1])


@pytest.mark.parametrize("update", ["fused-adamw", "data"])
def test_other_sizes_follow_weight_updates_that_skip_the_version_counter(update):
    """Fused optimizers and .data writes do not bump a parameter's version: outputs at a
    resized grid must still use the current position table (no stale cache)."""
    m = small_model(dtype=torch.float32, out_indices=[3], img_size=56)
    img, other = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        m(other)  # a first forward at the other grid
    if update == "data":
        m.pos_embed.data.add_(0.5)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
        for _ in range(5):
            opt.zero_grad()
            m(img)[0].square().mean().backward()
            opt.step()
    fresh = small_model(dtype=torch.float32, out_indices=[3], img_size=56)
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m(other)[0], fresh(other)[0])


def test_forwards_at_many_sizes_keep_nothing():
    m = small_model(out_indices=[0])
    before = ({k: v for k, v in vars(m).items() if k != "_modules"}, dict(m.named_buffers()))
    with torch.no_grad():
        for s in range(1, 12):
            m(torch.randn(1, 3, 14 * s, 14 * (s % 4 + 1)))
    after = ({k: v for k, v in vars(m).items() if k != "_modules"}, dict(m.named_buffers()))
    assert before[0].keys() == after[0].keys() and before[1].keys() == after[1].keys()
    assert not any(isinstance(v, (dict, list)) and v for k, v in after[0].items() if k.startswith("_pos"))


def test_model_built_under_inference_mode_runs_other_sizes():
    with torch.inference_mode():
        m = small_model(out_indices=[1])
        (o,) = m(torch.randn(1, 3, 42, 70))
    assert o.shape == (1, 96, 3, 5)


def test_any_multiple_of_patch_size_works():
    m = small_model(out_indices=[3])
    for h, w in [(14, 14), (42, 70), (84, 28)]:
        (o,) = m(torch.randn(1, 3, h, w))
        assert o.shape == (1, 96, h // 14, w // 14)


def test_early_exit_identical_and_skips_blocks():
    full = small_model(dtype=torch.float32, out_indices=[1, 3])
    early = small_model(dtype=torch.float32, out_indices=[1])
    early.load_state_dict(full.state_dict())
    ran = []
    for i, blk in enumerate(early.blocks):
        blk.register_forward_hook(lambda *a, i=i: ran.append(i))
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(full(img)[0], early(img)[0])
    assert ran == [0, 1]


def test_freeze_vit_keeps_fpn_trainable_across_modes():
    m = small_model(freeze_vit=True, with_fpn=True, out_indices=[0, 1, 2, 3])
    for mode in (True, False, True):
        m.train(mode)
        for name, p in m.named_parameters():
            assert p.requires_grad == name.startswith(("up1", "up2", "up3", "up4")), name


def test_gradients_reach_every_trainable_parameter_with_cp_and_drop_path():
    m = small_model(dtype=torch.float32, with_fpn=True, out_indices=[0, 1, 2, 3], with_cp=True,
                    drop_path_rate=0.3)
    m.train()
    calls = []
    orig = torch.utils.checkpoint.checkpoint
    import internvit_fast.model as mod
    mod.cp.checkpoint = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        outs = m(torch.randn(2, 3, 56, 56))
    finally:
        mod.cp.checkpoint = orig
    assert len(calls) == 4  # every block checkpointed in training
    sum(o.square().mean() for o in outs).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_drop_path_is_stochastic_in_train_and_off_in_eval():
    m = small_model(dtype=torch.float32, drop_path_rate=0.9, out_indices=[3], with_cp=False)
    img = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(img)[0], m(img)[0])
        m.train()
        assert not torch.equal(m(img)[0], m(img)[0])


@pytest.mark.parametrize("bad, msg", [
    (torch.randn(3, 56, 56), "4-D"),
    (torch.randn(1, 4, 56, 56), "channels"),
    (torch.randn(1, 3, 56, 50), "multiples of patch_size"),
    ("image", "torch.Tensor"),
    (torch.randint(0, 255, (1, 3, 56, 56), dtype=torch.uint8), "torch.uint8.*normalise"),
    (torch.ones(1, 3, 56, 56, dtype=torch.bool), "torch.bool"),
    (torch.ones(1, 3, 56, 56, dtype=torch.int64), "torch.int64"),
    (torch.ones(1, 3, 56, 56, dtype=torch.complex64), "torch.complex64"),
    (torch.ones(0, 3, 56, 56), "batch size 0"),
    (torch.ones(1, 3, 56, 56, device="meta"), "x is on meta but the model is on cpu"),
])
def test_bad_input_raises_clear_error(bad, msg):
    m = small_model()
    with pytest.raises((ValueError, TypeError), match=msg):
        m(bad)


def test_fpn_rejects_a_grid_smaller_than_two_by_two():
    m = small_model(with_fpn=True, out_indices=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 28 pixels"):
        m(torch.randn(1, 3, 14, 56))
    assert len(m(torch.randn(1, 3, 28, 28))) == 4


@pytest.mark.parametrize("kw, msg", [
    (dict(out_indices=[1, 4]), "out of range"),
    (dict(out_indices=[-1]), "out of range"),
    (dict(out_indices=[2, 1]), "sorted"),
    (dict(out_indices=[1, 1]), "duplicates"),
    (dict(out_indices=[]), "at least one"),
    (dict(out_indices=[0, 1.5]), r"out_indices \[0, 1.5\]: \[1.5\] are not integers"),
    (dict(out_indices=1), "out_indices must be a list"),
    (dict(out_indices="01"), "out_indices must be a list"),
    (dict(with_fpn=True, out_indices=[0, 1, 2]), "exactly four"),
    (dict(embed_dim=100), "divisible by num_heads"),
    (dict(dtype=torch.int8), "dtype"),
    (dict(img_size=0), "img_size=0: must be a positive integer"),
    (dict(img_size=50), "img_size=50: is not a multiple of patch_size"),
    (dict(num_heads=0), "num_heads=0: must be a positive integer"),
    (dict(patch_size=0), "patch_size=0: must be a positive integer"),
    (dict(depth=0, out_indices=[0]), "depth=0"),
    (dict(in_chans=0), "in_chans=0"),
    (dict(embed_dim=96.0), "embed_dim=96.0"),
    (dict(mlp_ratio=0), "mlp_ratio=0"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio=inf: must be a positive, finite number"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio=nan"),
    (dict(drop_path_rate=float("nan")), "drop_path_rate=nan"),
    (dict(drop_path_rate=1.5), r"drop_path_rate=1.5: must be a number in \[0, 1\)"),
    (dict(drop_path_rate=-0.1), "drop_path_rate=-0.1"),
    (dict(init_values=float("nan")), "init_values=nan"),
    (dict(use_flash_attn=[True, False]), "one bool per block"),
    (dict(use_flash_attn="yes"), "use_flash_attn='yes'"),
    (dict(fast=1), "fast=1: must be True or False"),
    (dict(with_cp=None), "with_cp=None"),
    (dict(pretrained=7), "pretrained=7"),
    (dict(cuda_graphs=-1), "cuda_graphs=-1"),
    (dict(cuda_graphs="on"), "cuda_graphs='on'"),
])
def test_bad_arguments_raise_clear_error(kw, msg):
    args = dict(SMALL)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        InternViT6B(**args)


def test_use_flash_attn_per_block_list():
    flags = [True, False, True, False]
    m = small_model(use_flash_attn=flags, dtype=torch.float32, out_indices=[3])
    assert [b.attn.use_flash_attn for b in m.blocks] == flags
    ref = small_model(use_flash_attn=False, dtype=torch.float32, out_indices=[3])
    ref.load_state_dict(m.state_dict())
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(m(img)[0], ref(img)[0], rtol=1e-5, atol=1e-5)


# The signature of upstream's backbone, as OpenGVLab/InternVL defines it in
# segmentation/mmseg_custom/models/backbones/intern_vit_6b.py (commit d1f1e5f6).
UPSTREAM_SIGNATURE = """def __init__(self, in_chans=3, patch_size=14, img_size=224, pretrain_size=224, qkv_bias=False,
    drop_path_rate=0.0, embed_dim=3200, num_heads=25, mlp_ratio=4, init_values=0.1, qk_normalization=True,
    depth=48, use_flash_attn=True, with_cp=True, layerscale_force_fp32=False, out_indices=[7, 11, 15, 23],
    freeze_vit=False, with_fpn=False, with_final_norm=False, pretrained=None): pass"""


def test_constructor_takes_upstreams_arguments_in_order_with_its_defaults():
    import ast
    import inspect
    fn = ast.parse(UPSTREAM_SIGNATURE).body[0]
    names = [a.arg for a in fn.args.args[1:]]
    defaults = [ast.literal_eval(d) for d in fn.args.defaults]
    ours = inspect.signature(InternViT6B.__init__).parameters
    assert list(ours)[1:1 + len(names)] == names  # the same order: positional calls work too
    for name, want in zip(names, defaults):
        got = ours[name].default
        assert (list(got) if name == "out_indices" else got) == want, name
    assert list(ours)[1 + len(names):] == ["fast", "dtype", "cuda_graphs", "precision", "fp8_attention"]  # ours come after upstream's
    assert ours["fast"].default is False and ours["dtype"].default is torch.bfloat16


def test_fpn_starts_from_upstreams_initialisation():
    """Upstream's _init_weights on up1..up4: transposed convs N(0, sqrt(2 / fan_out)), zero bias,
    norms weight 1 and bias 0 (PyTorch's own default would be about 0.4x that spread)."""
    m = InternViT6B(**dict(SMALL, dtype=torch.float32, with_fpn=True, out_indices=[0, 1, 2, 3]))
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert len(convs) == 3
    for conv in convs:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        w = conv.weight.double()
        # 36864 draws: the sample std is within 2% of the true one with overwhelming probability
        assert abs(w.std().item() / (2.0 / fan_out) ** 0.5 - 1) < 0.02, w.std().item()
        assert abs(w.mean().item()) < 0.05 * (2.0 / fan_out) ** 0.5
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    norm = m.up1[1]
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))
