"""Shared test helpers: small configurations and the parity rule."""
import torch

from internvit_fast import InternViT6B

SMALL = dict(embed_dim=96, num_heads=3, depth=4, img_size=56, patch_size=14, pretrain_size=56, out_indices=[1, 3])


def small_model(**kw) -> InternViT6B:
    args = dict(SMALL)
    args.update(kw)
    model = InternViT6B(**args)
    randomize(model)
    return model


def randomize(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Random, non-trivial values for every parameter (norm weights and gammas too):
    initial ones and zeros would hide a swapped or ignored weight."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + scale * torch.randn_like(p, dtype=torch.float32))
            else:
                p.copy_(scale * torch.randn_like(p, dtype=torch.float32) / max(1, p[0].numel()) ** 0.5 * 3)


def assert_parity(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, atol: float = 1e-5,
                  what: str = "") -> None:
    """The parity rule: |out - ref64| <= 2 * |torch_same_dtype - ref64| (max) + atol, no NaN.

    For fp32 the framework's own error is at rounding level, so this is 'close to rounding'.
    """
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or invalid element)"
    err = (out.double() - ref64.double()).abs().max().item()
    base = (torch_same_dtype.double() - ref64.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x torch's {base:.3g} + {atol:g}"
