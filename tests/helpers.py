"""Shared test helpers: small configurations and the parity rule."""
import torch

from internvit_fast import InternViT6B
from internvit_fast.kernels import parity

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
    """The parity rule (internvit_fast.kernels.parity): |out - ref64| <= 2 * |torch_same_dtype - ref64| (max)
    + atol, no NaN."""
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    verdict = parity.check(out, ref64, torch_same_dtype, atol)
    assert verdict.ok, f"{what}: {verdict}"
