"""The native segmentor (heads.py + segmentor.py) against MMSegmentation's EncoderDecoder."""
import numpy as np
import pytest
import torch

from helpers import assert_parity
from internvit_fast.segmentation.presets import PRESETS
from internvit_fast.segmentation.segmentor import Segmentor, resized_size

SMALL = dict(PRESETS["small"])


def _small(fast=False, **kw):
    seg = Segmentor.build("small", fast=fast, dtype=kw.pop("dtype", torch.float32), **kw)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for name, t in seg.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn_like(t) * 0.1)
    return seg


def test_resized_size_is_mmcvs():
    mmcv = pytest.importorskip("mmcv")
    for h, w in [(512, 683), (683, 512), (1024, 2048), (100, 3000), (37, 41), (504, 504), (333, 500), (1000, 337)]:
        img = np.zeros((h, w, 3), np.uint8)
        first = mmcv.imrescale(img, (2016, 504)).shape[:2]
        second = mmcv.imresize_to_multiple(np.zeros(first + (3,), np.uint8), 14, scale_factor=1).shape[:2]
        assert resized_size(h, w, 504, 2016, 14) == (first, second), (h, w)


def test_prepare_is_mmsegs_test_pipeline_within_a_grey_level(tmp_path):
    pytest.importorskip("mmseg")
    from mmcv.transforms import Resize
    from mmseg.datasets.transforms import ResizeToMultiple
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)  # RGB
    # the configs' test pipeline at the small model's crop (56): mmcv works in BGR
    results = ResizeToMultiple(size_divisor=14)(Resize(scale=(224, 56), keep_ratio=True)(dict(img=img[..., ::-1].copy())))
    want = results["img"][..., ::-1]
    seg = _small()
    image = torch.from_numpy(img.copy()).permute(2, 0, 1)
    want = torch.from_numpy(want.astype(np.float32)).permute(2, 0, 1)
    got = seg.prepare(image)  # through OpenCV, which mmcv needs: what mmseg's pipeline gives
    assert torch.equal(got, (want[None] - seg.mean) / seg.std)
    # without OpenCV (or a float image): torch's bilinear, within one grey level of OpenCV's fixed point
    got = seg.prepare(image.float()) * seg.std + seg.mean
    assert tuple(got.shape[2:]) == tuple(want.shape[1:])
    assert (got[0] - want).abs().max() <= 1.0 + 1e-4
    # a wide image: the long side's cap (4x the crop) decides the scale
    wide = rng.integers(0, 256, (20, 130, 3), dtype=np.uint8)
    results = ResizeToMultiple(size_divisor=14)(Resize(scale=(224, 56), keep_ratio=True)(dict(img=wide[..., ::-1].copy())))
    assert tuple(seg.prepare(torch.from_numpy(wide.copy()).permute(2, 0, 1)).shape[2:]) == results["img"].shape[:2]
    # the normalisation is mmseg's data preprocessor's (BGR in, RGB out)
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    pre = SegDataPreProcessor(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
    bgr = torch.from_numpy(np.ascontiguousarray(results["img"])).permute(2, 0, 1)
    from mmseg.structures import SegDataSample
    normalised = pre(dict(inputs=[bgr], data_samples=[SegDataSample()]))["inputs"]
    rgb = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])).permute(2, 0, 1).float()
    assert torch.equal((rgb[None] - seg.mean) / seg.std, normalised)


def _mmseg_segmentor(seg):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    import internvit_fast.mmseg  # noqa: F401
    bn = dict(type="BN", requires_grad=True)
    c = SMALL["embed_dim"]
    cfg = dict(type="EncoderDecoder",
               backbone=dict(type="InternViT6B", **SMALL, fast=False, dtype="float32", drop_path_rate=0.0,
                             with_cp=False),
               decode_head=dict(type="UPerHead", in_channels=[c] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                                channels=32, dropout_ratio=0.1, num_classes=150, norm_cfg=bn, align_corners=False),
               auxiliary_head=dict(type="FCNHead", in_channels=c, in_index=2, channels=32, num_convs=1,
                                   concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=bn,
                                   align_corners=False),
               test_cfg=ConfigDict(mode="slide", crop_size=seg.crop_size, stride=seg.stride))
    return MODELS.build(cfg).eval()


def test_mmseg_checkpoint_loads_and_gives_mmsegs_logits_and_labels(tmp_path):
    pytest.importorskip("mmseg")
    seg = _small(head_dtype=torch.float32, channels_last=False)
    ref = _mmseg_segmentor(seg)
    ref.load_state_dict(_small().state_dict())  # random weights and statistics
    # saved as mmengine's runner saves a segmentor (meta and state_dict), read by the safe loader
    torch.save({"meta": {"iter": 3}, "state_dict": ref.state_dict()}, tmp_path / "seg.pth")
    seg.load_checkpoint(tmp_path / "seg.pth")
    image = torch.randint(0, 256, (3, 61, 97), dtype=torch.uint8)
    x = seg.prepare(image)  # (1, 3, 56, 98): two windows across
    metas = [dict(ori_shape=(61, 97), img_shape=tuple(x.shape[2:]), pad_shape=tuple(x.shape[2:]))]
    with torch.no_grad():
        want = ref.inference(x, metas)
        seg.max_windows = 1  # one window per backbone call, as mmseg runs them
        assert torch.equal(seg.slide(x), want)  # fp32 heads, the same ops and order: bit for bit
        seg.max_windows = 8  # batched windows: the backbone's GEMMs see another M, float rounding apart
        torch.testing.assert_close(seg.slide(x), want, rtol=1e-5, atol=1e-5)
    from mmseg.structures import SegDataSample
    sample = SegDataSample(metainfo=metas[0])
    with torch.no_grad():
        result = ref.postprocess_result(want, [sample])[0]
        seg.max_windows = 1
        labels, logits = seg.predict(image, return_logits=True)
        alone = seg.predict(image)  # without the full-size logits: the same labels
    assert labels[0].shape == (61, 97) and torch.equal(labels[0], result.pred_sem_seg.data[0])
    assert torch.equal(logits[0], result.seg_logits.data)  # resized back as mmseg does
    assert torch.equal(alone[0], labels[0])


def test_a_checkpoint_of_another_head_is_refused(tmp_path):
    seg = _small()
    sd = seg.state_dict()
    sd["decode_head.conv_seg.weight"] = torch.zeros(19, 32, 1, 1)  # Cityscapes' 19 classes
    torch.save({"state_dict": sd}, tmp_path / "city.pth")
    from internvit_fast.checkpoint import CheckpointError
    before = seg.decode_head.conv_seg.weight.clone()
    with pytest.raises(CheckpointError, match="decode_head.conv_seg.weight"):
        seg.load_checkpoint(tmp_path / "city.pth")
    assert torch.equal(seg.decode_head.conv_seg.weight, before)  # nothing half-loaded


def test_fast_bf16_segmentor_meets_the_parity_rule_against_the_reference():
    torch.manual_seed(0)
    fast = _small(fast=True, dtype=torch.bfloat16)
    ref = _small(fast=False, dtype=torch.bfloat16)
    ref.load_state_dict(fast.state_dict())
    exact = _small(fast=False, dtype=torch.float32, head_dtype=torch.float64)
    exact.load_state_dict(fast.state_dict())
    exact.backbone.double()
    image = torch.randint(0, 256, (3, 70, 59), dtype=torch.uint8)
    x = fast.prepare(image)
    with torch.no_grad():
        got, eager = fast.slide(x), ref.slide(x)
        want = exact.slide(x.double())
    assert fast.head_dtype == torch.bfloat16 and got.dtype == torch.float32
    assert_parity(got, want, eager)


def test_segmentor_refuses_bad_input():
    seg = _small()
    with pytest.raises(ValueError, match="the image is 3x4000: too elongated"):
        seg.predict(torch.zeros(3, 3, 4000, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, H, W\) RGB"):
        seg.predict(torch.zeros(1, 20, 20))
    with pytest.raises(ValueError, match="uint8 or float"):
        seg.predict(torch.zeros(3, 20, 20, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        seg.predict(torch.zeros(3, 0, 20))
    with pytest.raises(ValueError, match="stride"):
        Segmentor.build("small", fast=False, stride=(60, 60))
    with pytest.raises(ValueError, match="config must be one of"):
        Segmentor.build("cityscapes")


def test_presets_heads_are_the_configs_heads():
    """Segmentor.build's heads have the shapes of the shipped configs' heads (mmseg builds them
    on the meta device: no memory for a 6B model's heads)."""
    pytest.importorskip("mmseg")
    import os
    from mmengine.config import Config
    from mmseg.registry import MODELS
    import internvit_fast.mmseg  # noqa: F401
    from internvit_fast.segmentation.segmentor import HEADS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for config, name in (("upernet", "upernet_internvit6b_504_80k_ade20k_fast.py"),
                         ("linear", "linear_internvit6b_504_80k_ade20k_frozen_fast.py")):
        cfg = Config.fromfile(os.path.join(root, "configs", name)).model
        with torch.device("meta"):
            for part in ("decode", "auxiliary"):
                want = cfg.get(f"{part}_head" if part == "auxiliary" else "decode_head")
                if want is None:
                    assert HEADS[config][part] is None
                    continue
                want = dict(want, norm_cfg=dict(type="BN", requires_grad=True))
                ref = {k: v.shape for k, v in MODELS.build(want).state_dict().items()}
                ours = {k: v.shape for k, v in HEADS[config][part](3200).state_dict().items()}
                assert ours == ref, (config, part)


def test_segmentor_checkpoint_resizes_the_position_table_and_takes_counters(tmp_path):
    """A segmentor file with a position table of another grid (pretrained at 224) is resized
    as for the backbone alone; BatchNorm counters load as int64 or int32; a file without
    the auxiliary head loads (inference never runs it); int tensors never enter float ones."""
    from internvit_fast.checkpoint import CheckpointError
    from internvit_fast.checkpoint.loader import resize_pos_embed
    seg = _small()
    sd = seg.state_dict()
    big = torch.randn(1, 1 + 6 * 6, sd["backbone.pos_embed"].shape[-1])
    sd["backbone.pos_embed"] = big
    sd = {k: (v.int() if k.endswith("num_batches_tracked") else v) for k, v in sd.items()
          if not k.startswith("auxiliary_head.")}
    torch.save({"state_dict": sd}, tmp_path / "seg.pth")
    other = _small()
    other.load_checkpoint(tmp_path / "seg.pth")
    assert torch.equal(other.backbone.pos_embed, resize_pos_embed(big, seg.backbone.pos_embed.shape))
    sd["decode_head.conv_seg.weight"] = sd["decode_head.conv_seg.weight"].long()
    torch.save({"state_dict": sd}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="decode_head.conv_seg.weight: has dtype torch.int64"):
        other.load_checkpoint(tmp_path / "int.pth")


def test_predict_labels_without_full_size_logits_equal_the_argmax():
    """Labels are resized a few classes at a time (a photo's 150 full-size maps would take
    gigabytes); the result is the full resize's argmax, ties to the first class."""
    seg = _small()
    logits = torch.randn(1, 150, 9, 13)
    logits[:, 40] = logits[:, 3]  # exact ties across chunks
    want = seg._to_size(logits, (31, 45)).argmax(0)
    assert torch.equal(seg._labels(logits, (31, 45)), want)
    assert torch.equal(seg._labels(logits, (31, 45), classes_at_once=150), want)


def test_upstreams_linear_probe_names_its_norm_norm(tmp_path):
    """Upstream's linear-probe checkpoints (its FCNHead with num_convs=0 and with_norm) keep
    BNHead's BatchNorm under decode_head.norm.*: they load into BNHead's bn."""
    from internvit_fast.segmentation.heads import BNHead
    from internvit_fast.model import InternViT6B
    small = dict(SMALL, out_indices=[3], with_fpn=False)
    seg = Segmentor(InternViT6B(**small, dtype=torch.float32), BNHead(96, 96, 150), crop_size=(56, 56),
                    stride=(42, 42), head_dtype=torch.float32, channels_last=False).eval()
    sd = {k.replace("decode_head.bn.", "decode_head.norm."): v.clone() for k, v in seg.state_dict().items()}
    sd["decode_head.norm.running_var"] = torch.rand(96) + 0.5
    torch.save({"state_dict": sd}, tmp_path / "linear.pth")
    seg.load_checkpoint(tmp_path / "linear.pth")
    assert torch.equal(seg.decode_head.bn.running_var, sd["decode_head.norm.running_var"])
