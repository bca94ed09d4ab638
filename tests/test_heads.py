"""The plain-torch heads against MMSegmentation's: same parameter names, same logits."""
import pytest
import torch

from helpers import assert_parity
from internvit_fast.segmentation.heads import BNHead, FCNHead, UPerHead

mmseg = pytest.importorskip("mmseg", reason="the reference heads are mmseg's (installed in CI)")
from mmseg.registry import MODELS  # noqa: E402

import internvit_fast.mmseg  # noqa: E402,F401  (registers the linear-probe BNHead for mmseg)

BN = dict(type="BN", requires_grad=True)


def _features(batch=2, channels=(24, 24, 24, 24), grid=9, dtype=torch.float32):
    # InternViT's FPN levels: 4x, 2x, 1x and 0.5x the patch grid (odd sizes on purpose)
    sizes = [grid * 4, grid * 2, grid, (grid + 1) // 2]
    return [torch.randn(batch, c, s, s + 3, dtype=dtype) for c, s in zip(channels, sizes)]


def _randomize(module):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t) * (0.2 if t.ndim > 1 else 1.0))


CASES = {
    "uper": (dict(type="UPerHead", in_channels=[24, 24, 24, 24], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                  channels=16, dropout_ratio=0.1, num_classes=7, norm_cfg=BN, align_corners=False),
             lambda: UPerHead([24, 24, 24, 24], 16, 7, (1, 2, 3, 6), (0, 1, 2, 3), 0.1, False)),
    "fcn": (dict(type="FCNHead", in_channels=24, in_index=2, channels=16, num_convs=1, concat_input=False,
                 dropout_ratio=0.1, num_classes=7, norm_cfg=BN, align_corners=False),
            lambda: FCNHead(24, 16, 7, num_convs=1, concat_input=False, in_index=2)),
    "fcn-concat-2": (dict(type="FCNHead", in_channels=24, in_index=1, channels=16, num_convs=2, concat_input=True,
                          dropout_ratio=0.1, num_classes=7, norm_cfg=BN, align_corners=False),
                     lambda: FCNHead(24, 16, 7, num_convs=2, concat_input=True, in_index=1)),
    "bn": (dict(type="BNHead", in_channels=24, in_index=0, channels=24, dropout_ratio=0.0, num_classes=7,
                norm_cfg=BN, align_corners=False),
           lambda: BNHead(24, 24, 7, in_index=0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_head_has_mmseg_keys_and_logits(case):
    cfg, build = CASES[case]
    ref = MODELS.build(cfg).eval()
    _randomize(ref)
    sd = ref.state_dict()
    native = build().eval()
    assert set(native.state_dict()) == set(sd)  # the same names: mmseg checkpoints load as they are
    native.load_state_dict(sd, strict=True)
    feats = _features()
    with torch.no_grad():
        want, got = ref(feats), native(feats)
    assert got.shape == want.shape
    assert torch.equal(got, want)  # the same ops in the same order: fp32 logits bit for bit

    # bf16, as the backbone's features arrive: the parity rule against float64
    ref64 = MODELS.build(cfg).eval().double()
    ref64.load_state_dict(sd)
    native16 = build().eval().to(torch.bfloat16)
    native16.load_state_dict(sd)
    with torch.no_grad():
        exact = ref64([f.double() for f in feats])
        eager16 = ref.to(torch.bfloat16)([f.bfloat16() for f in feats])
        ours16 = native16([f.bfloat16() for f in feats])
    assert_parity(ours16, exact, eager16, what=case)


def test_heads_refuse_bad_settings():
    with pytest.raises(ValueError, match="in_index"):
        UPerHead([8, 8], 4, 3, in_index=(0, 1, 2))
    with pytest.raises(ValueError, match="pool_scales"):
        UPerHead([8], 4, 3, pool_scales=(1, 0), in_index=(0,))
    with pytest.raises(ValueError, match="num_classes"):
        FCNHead(8, 4, 0)
    with pytest.raises(ValueError, match="in_channels .* must equal channels"):
        BNHead(8, 4, 3)
    with pytest.raises(ValueError, match="in_index 5 but the backbone gave 4"):
        FCNHead(24, 16, 7, in_index=5)(_features())
