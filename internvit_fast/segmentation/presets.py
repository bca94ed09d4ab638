"""The upstream segmentation configurations of the backbone, by name.

Shared by the CLI, the benchmarks and the tests so each configuration is stated once.
"""
FULL = dict(embed_dim=3200, num_heads=25, depth=48, mlp_ratio=4, patch_size=14, img_size=504,
            pretrain_size=224, qkv_bias=False, init_values=0.1, qk_normalization=True)

PRESETS = {
    # UPerNet with the FPN: four levels at 4x, 2x, 1x and 0.5x of the patch grid.
    "upernet": dict(FULL, out_indices=[11, 23, 35, 47], with_fpn=True),
    # Linear probing: one level, no FPN.
    "linear": dict(FULL, out_indices=[44], with_fpn=False),
    # Few-shot: the last block.
    "fewshot": dict(FULL, out_indices=[47], with_fpn=False),
    # A small stand-in with the same structure, for CPUs and tests.
    "small": dict(embed_dim=96, num_heads=3, depth=4, mlp_ratio=4, patch_size=14, img_size=56,
                  pretrain_size=56, out_indices=[0, 1, 2, 3], with_fpn=True),
}


def flops_per_image(cfg: dict, img_hw=None) -> float:
    """Counted FLOPs (2 per multiply-add) of one image through the blocks that run, and the FPN.

    GEMMs (qkv, proj, fc1, fc2), attention (q k^T and attn v), the patch embedding
    and the FPN's transposed convolutions; norms and elementwise work are not counted.
    """
    c, p = cfg["embed_dim"], cfg["patch_size"]
    h, w = img_hw or (cfg["img_size"], cfg["img_size"])
    gh, gw = h // p, w // p
    n = gh * gw + 1
    hidden = int(c * cfg.get("mlp_ratio", 4))
    blocks = max(cfg["out_indices"]) + 1
    per_block = 2 * n * (c * 3 * c + c * c + 2 * c * hidden) + 2 * 2 * n * n * c
    total = blocks * per_block + 2 * gh * gw * c * 3 * p * p
    if cfg.get("with_fpn"):
        # ConvTranspose(2, stride 2): each output pixel is one C x C product.
        up1 = 2 * c * c * (4 * gh * gw + 16 * gh * gw)
        up2 = 2 * c * c * 4 * gh * gw
        total += up1 + up2
    return float(total)
