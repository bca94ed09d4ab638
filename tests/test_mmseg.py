"""The MMSegmentation integration, for real: mmsegmentation 1.2.2 and a full mmcv 2.1.0.

Each shipped config is built as an EncoderDecoder with its heads, shrunk to a small
backbone; predict runs slide inference on an image that is not a multiple of the crop,
and one training step runs loss + backward on CPU. CI installs mmseg (.ci/run) and sets
CI=true, so there a missing mmseg fails instead of skipping.
"""
import glob
import os

import pytest
import torch

pytestmark = pytest.mark.mmseg

if not os.environ.get("CI"):
    pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install -e '.[mmseg]', see README)")

from mmengine.config import Config  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
C, CLASSES = 96, 5

register_all_modules()


def shrunk(path, **backbone):
    """The config with its backbone shrunk (width 96, 3 heads, 4 blocks, 56px crops), BN for SyncBN."""
    cfg = Config.fromfile(path)  # also runs custom_imports: internvit_fast.mmseg registers itself
    m = cfg.model
    n_out = len(m.backbone.out_indices)
    m.backbone.update(embed_dim=C, num_heads=3, depth=4, img_size=56, pretrain_size=56,
                      out_indices=[0, 1, 2, 3] if n_out == 4 else [3], pretrained=None, **backbone)
    m.data_preprocessor.size = (56, 56)
    m.test_cfg.update(crop_size=(56, 56), stride=(42, 42))
    for head in (m.decode_head, m.get("auxiliary_head")):
        if not head:
            continue
        head.num_classes = CLASSES
        head.norm_cfg = dict(type="BN", requires_grad=True)
        if isinstance(head.in_channels, (list, tuple)):
            head.in_channels = [C] * len(head.in_channels)
        else:
            head.in_channels = C
        head.channels = C if head.type == "BNHead" else 16
    return cfg


def _sample(h, w, labels=True, padded=None):
    meta = dict(img_shape=(h, w), ori_shape=(h, w))
    if padded:  # a batch padded to a common size, as mmseg's data preprocessor records it
        meta.update(pad_shape=padded, padding_size=[0, padded[1] - w, 0, padded[0] - h])
    s = SegDataSample(metainfo=meta)
    if labels:
        s.gt_sem_seg = PixelData(data=torch.randint(0, CLASSES, (1, h, w)))
    return s


def _params(model, prefix):
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-3] for p in CONFIGS])
def test_config_predicts_and_trains(path):
    assert len(CONFIGS) == 4
    cfg = shrunk(path)
    model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert type(backbone).__module__ == "internvit_fast.mmseg.backbone" and backbone.fast
    assert backbone.dtype == torch.bfloat16  # upstream's convention: bf16 backbone, fp32 heads
    frozen = cfg.model.backbone.freeze_vit

    # predict: slide inference over a 70x100 image with 56x56 crops (not a multiple of either)
    model.eval()
    data = dict(inputs=[torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8)],
                data_samples=[_sample(70, 100, labels=False)])
    with torch.no_grad():
        (out,) = model.test_step(data)
    assert out.pred_sem_seg.data.shape == (1, 70, 100)
    assert out.seg_logits.data.shape == (CLASSES, 70, 100) and torch.isfinite(out.seg_logits.data).all()

    # one training step
    model.train()
    data = dict(inputs=[torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8) for _ in range(2)],
                data_samples=[_sample(56, 56), _sample(56, 56)])
    data = model.data_preprocessor(data, True)
    losses = model.loss(data["inputs"], data["data_samples"])
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss)
    loss.backward()
    head = _params(model, "decode_head.")
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in head.items() if "conv_seg" in n)
    fpn = _params(model, "backbone.up")
    assert all(p.grad is not None for p in fpn.values())
    vit = _params(model, "backbone.blocks.")
    if frozen:
        assert all(not p.requires_grad and p.grad is None for p in vit.values())
    else:
        assert all(p.grad is not None for p in vit.values())


def test_frozen_vit_stays_frozen_and_runs_kernels_in_training(monkeypatch):
    import internvit_fast.fast_path as fast_path
    cfg = shrunk(os.path.join(ROOT, "configs", "upernet_internvit6b_504_80k_ade20k_frozen_fast.py"))
    model = MODELS.build(cfg.model)
    calls = []
    real = fast_path.forward_blocks
    monkeypatch.setattr(fast_path, "forward_blocks", lambda *a: calls.append(1) or real(*a))
    model.train()
    model.eval()
    model.train()
    assert not any(p.requires_grad for p in model.backbone.vit_parameters())
    assert all(p.requires_grad for p in _params(model, "backbone.up").values())
    x = torch.randn(1, 3, 56, 56)
    feats = model.extract_feat(x)
    assert calls == [1] and all(f.dtype == torch.float32 for f in feats)


@pytest.mark.parametrize("how", ["init_cfg", "pretrained"])
def test_pretrained_weights_load_through_project_loader(tmp_path, how):
    from safetensors.torch import save_file
    src = MODELS.build(shrunk(CONFIGS[0]).model).backbone
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    sd = {"vision_model.embeddings.class_embedding": src.cls_token.clone()}  # an InternVL layout
    for k, v in src.state_dict().items():
        if k == "cls_token" or k.startswith("up"):
            continue
        k = k.replace("pos_embed", "embeddings.position_embedding")
        k = k.replace("patch_embed.proj", "embeddings.patch_embedding").replace("blocks.", "encoder.layers.")
        sd["vision_model." + k.replace(".gamma", "")] = v.clone()
    path = str(tmp_path / "vit.safetensors")
    save_file(sd, path)
    if how == "init_cfg":
        cfg = shrunk(CONFIGS[0], init_cfg=dict(type="Pretrained", checkpoint=path))  # strict: no FPN is fine
        model = MODELS.build(cfg.model)
        assert not torch.equal(model.backbone.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
        model.init_weights()
    else:
        cfg = shrunk(CONFIGS[0])
        cfg.model.pretrained = None
        cfg.model.backbone.update(pretrained=path, with_fpn=False, out_indices=[3])
        model = MODELS.build(cfg.model)
    got = model.backbone
    for name in ("cls_token", "pos_embed", "blocks.1.mlp.fc1.weight", "blocks.3.ls2.gamma"):
        assert torch.equal(got.state_dict()[name], src.state_dict()[name]), name


@pytest.mark.parametrize("sizes, max_windows", [
    ([(70, 98)], 8),                          # not a multiple of the crop or the stride
    ([(42, 112)], 3),                         # shorter than a window: one row of narrow windows
    ([(84, 126), (56, 70), (42, 42)], 4),     # a batch of different sizes, padded as mmseg pads
    ([(84, 126), (56, 70)], 1),
])
def test_batched_slide_inference_equals_mmseg(sizes, max_windows):
    from internvit_fast.mmseg import BatchedSlideEncoderDecoder
    cfg = shrunk(CONFIGS[0], dtype=torch.float32, fast=False)
    cfg.model.test_cfg.update(max_windows=max_windows)
    torch.manual_seed(0)
    batched = MODELS.build(cfg.model).eval()
    assert type(batched) is BatchedSlideEncoderDecoder
    cfg.model.type = "EncoderDecoder"
    plain = MODELS.build(cfg.model).eval()
    plain.load_state_dict(batched.state_dict())
    padded = (max(h for h, _ in sizes), max(w for _, w in sizes))
    inputs = torch.zeros(len(sizes), 3, *padded)
    for i, (h, w) in enumerate(sizes):
        inputs[i, :, :h, :w] = torch.randn(3, h, w)
    calls = []
    real = batched.encode_decode
    batched.encode_decode = lambda x, metas: calls.append(x.shape[0]) or real(x, metas)
    with torch.no_grad():
        got = batched.predict(inputs, [_sample(h, w, False, padded) for h, w in sizes])
        want = plain.predict(inputs, [_sample(h, w, False, padded) for h, w in sizes])
    assert max(calls) <= max_windows and sum(calls) == len(sizes) * (sum(calls) // len(sizes))
    for g, w in zip(got, want):
        assert g.seg_logits.data.shape == w.seg_logits.data.shape
        torch.testing.assert_close(g.seg_logits.data, w.seg_logits.data, rtol=1e-5, atol=1e-5)
        assert torch.equal(g.pred_sem_seg.data, w.pred_sem_seg.data)
