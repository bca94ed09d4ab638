"""The reference model against an independent statement of upstream's math, and its behaviour."""
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

    def ls(t, g):
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
    x = x + ls(a, p("ls1.gamma"))
    h = rms(x, p("norm2.weight")) @ p("mlp.fc1.weight").t() + p("mlp.fc1.bias")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    m = h @ p("mlp.fc2.weight").t() + p("mlp.fc2.bias")
    return x + ls(m, p("ls2.gamma"))


def model_math(model, img, heads):
    sd = {k: v for k, v in model.state_dict().items()}
    x = F.conv2d(img.to(model.dtype), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    B, C, H, W = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    outs = []
    for i in range(max(model.out_indices) + 1):
        x = block_math(sd, i, x, heads, model.blocks[0].ls1.force_fp32)
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
    with torch.no_grad():
        m(torch.randn(1, 3, 56, 56))


def test_position_table_resized_for_other_sizes_and_cached():
    m = small_model(dtype=torch.float32, out_indices=[0])
    table = m.pos_embed_for((4, 4))
    assert table is m.pos_embed  # at img_size: the loaded table, unchanged
    with torch.no_grad():
        t1 = m.pos_embed_for((3, 5))
        assert m.pos_embed_for((3, 5)) is t1  # cached
        g = m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        want = F.interpolate(g, size=(3, 5), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(t1[:, 1:], want)
        torch.testing.assert_close(t1[:, :1], m.pos_embed[:, :1])
        m.pos_embed.add_(1.0)  # a changed table invalidates the cache
        assert not torch.equal(m.pos_embed_for((3, 5)), t1)


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
])
def test_bad_input_raises_clear_error(bad, msg):
    m = small_model()
    with pytest.raises((ValueError, TypeError), match=msg):
        m(bad)


@pytest.mark.parametrize("kw, msg", [
    (dict(out_indices=[1, 4]), "out of range"),
    (dict(out_indices=[-1]), "out of range"),
    (dict(out_indices=[2, 1]), "sorted"),
    (dict(out_indices=[1, 1]), "duplicates"),
    (dict(out_indices=[]), "at least one"),
    (dict(with_fpn=True, out_indices=[0, 1, 2]), "exactly four"),
    (dict(embed_dim=100), "divisible by num_heads"),
    (dict(dtype=torch.int8), "dtype"),
])
def test_bad_arguments_raise_clear_error(kw, msg):
    args = dict(SMALL)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        InternViT6B(**args)


def test_constructor_defaults_are_upstreams():
    import inspect
    sig = inspect.signature(InternViT6B.__init__).parameters
    want = dict(in_chans=3, patch_size=14, img_size=224, pretrain_size=224, qkv_bias=False, drop_path_rate=0.0,
                embed_dim=3200, num_heads=25, mlp_ratio=4, init_values=0.1, qk_normalization=True, depth=48,
                use_flash_attn=True, with_cp=True, layerscale_force_fp32=False, freeze_vit=False,
                with_fpn=False, with_final_norm=False, pretrained=None, fast=False, dtype=torch.bfloat16)
    for k, v in want.items():
        assert sig[k].default == v, k
    assert list(sig["out_indices"].default) == [7, 11, 15, 23]
