"""The block's ops around its linear layers, as ``Block.forward_fused`` uses them:

    x, h = attention_residual(a, proj, gamma1, x, norm2, rowscale)    x + gamma1 * proj(a), norm2 of it
    x, h = mlp_residual(h, fc1, fc2, gamma2, x, next_norm, rowscale)  x + gamma2 * fc2(GELU(fc1(h))), next norm

Inference (no gradient through the block, no drop path) runs the fused ops, each a torch
custom op that runs the GEMM with its epilogue (gemm.py) or, where the card's tuned table
measured it faster, its unfused alternative:

  - ``linear_gelu``: GEMM + GELU epilogue, or cuBLAS (F.linear) + the in-place GELU kernel;
  - ``linear_residual_norm``: GEMM + residual epilogue, then ``rms_norm``; or cuBLAS +
    ``residual_rms_norm``.

Training (gradients flow, or drop path draws a row scale) runs the differentiable
composition: cuBLAS GEMMs (their outputs are what the backward needs) with the norm,
residual, LayerScale, drop path and GELU work in kernels that have backward kernels; the
MLP as one op (``mlp_residual_norm``) whose backward applies GELU's derivative in the
epilogue of the GEMM that computes fc1's output gradient (``linear_gelu_grad``).

An FP8 layer (precision="fp8") runs the FP8 ops of fp8.py: for inference, and in train mode
without gradients into the blocks (freeze_vit), where drop path's row scale makes proj/fc2
the FP8 GEMM followed by the residual kernel that takes it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, launch, registry
from .common import rows_of
from .fp8 import Fp8Activation, fp8_linear, fp8_linear_gelu, fp8_linear_residual_norm, quantize_fp8, rms_norm_fp8
from .gelu import gelu, gelu_launch
from .gemm import TABLE_NAME, linear_launch, linear_ref
from .launch import LaunchPlan, Meta, Target
from .registry import Choice, KernelSpec, Shape
from .rms_norm import residual_rms_norm, rms_norm, rms_norm_ref


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fp8(layer: nn.Module) -> bool:
    """Whether ``layer`` holds an e4m3 weight with block scales (internvit_fast.fp8.Fp8Linear):
    then the op runs the FP8 kernels. They have no backward: training with gradients is
    refused earlier (InternViT6B.forward_features); what runs here is inference, or train
    mode without gradients into the blocks (freeze_vit, torch.no_grad()), where drop path
    still draws its row scale."""
    return getattr(layer, "weight_scale", None) is not None


def _quantized(h) -> Fp8Activation:
    """h as an FP8 GEMM's input (quantized by the row kernel unless it already is)."""
    if isinstance(h, Fp8Activation):
        return h
    q, s = quantize_fp8(h)
    return Fp8Activation(q, s, h.dtype)


def norm_input(x: torch.Tensor, norm: nn.Module, layer: nn.Module):
    """``norm(x)`` as the input of ``layer``: for an FP8 layer e4m3 with scales from the norm
    kernel itself (an Fp8Activation), else the activation."""
    if _fp8(layer):
        return Fp8Activation(*rms_norm_fp8(x, norm.weight, norm.eps), x.dtype)
    return rms_norm(x, norm.weight, norm.eps)


def linear(h, layer: nn.Module) -> torch.Tensor:
    """``layer(h)`` on the fast path: cuBLAS, or the FP8 GEMM for an FP8 layer (``h`` an
    Fp8Activation from norm_input, or an activation to quantize first)."""
    if _fp8(layer):
        h = _quantized(h)
        return fp8_linear(h.q, h.s, layer.weight, layer.weight_scale, layer.bias, h.dtype)
    return F.linear(h, layer.weight, layer.bias)


def _next(x_new: torch.Tensor, hq: torch.Tensor, hs: torch.Tensor, norm_weight):
    return x_new, (Fp8Activation(hq, hs, x_new.dtype) if norm_weight is not None else x_new.new_empty(0))


def attention_residual(a: torch.Tensor, proj: nn.Linear, gamma: Optional[torch.Tensor], x: torch.Tensor,
                       norm: Optional[nn.Module], rowscale: Optional[torch.Tensor] = None,
                       eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + rowscale * gamma * proj(a), norm of it): the attention half's residual and the norm
    that follows (norm2). ``norm`` None: no norm (h empty)."""
    nw, eps = (norm.weight, norm.eps) if norm is not None else (None, eps)
    if _fp8(proj):
        a8 = _quantized(a)
        if rowscale is None:
            return _next(*fp8_linear_residual_norm(a8.q, a8.s, proj.weight, proj.weight_scale, proj.bias, gamma, x,
                                                   nw, eps), nw)
        # Drop path (train mode, no gradients): the FP8 GEMM, then the residual kernel that takes the row scale.
        return residual_rms_norm(x, fp8_linear(a8.q, a8.s, proj.weight, proj.weight_scale, proj.bias, a8.dtype),
                                 gamma, nw, eps, rowscale)
    if rowscale is not None or _needs_grad(a, x, proj.weight, proj.bias, gamma, nw):
        y = F.linear(a, proj.weight, proj.bias)
        return residual_rms_norm(x, y, gamma, nw, eps, rowscale)
    return linear_residual_norm(a, proj.weight, proj.bias, gamma, x, nw, eps)


def mlp_residual(h: torch.Tensor, mlp: nn.Module, gamma: Optional[torch.Tensor], x: torch.Tensor,
                 norm: Optional[nn.Module], rowscale: Optional[torch.Tensor] = None,
                 eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + rowscale * gamma * fc2(GELU(fc1(h))), norm of it): the MLP half and the next
    block's norm1 (``norm`` None for the last block: h empty)."""
    nw, eps = (norm.weight, norm.eps) if norm is not None else (None, eps)
    fc1, fc2 = mlp.fc1, mlp.fc2
    if _fp8(fc1):
        h8 = _quantized(h)
        u, su = fp8_linear_gelu(h8.q, h8.s, fc1.weight, fc1.weight_scale, fc1.bias, h8.dtype)
        if rowscale is None:
            return _next(*fp8_linear_residual_norm(u, su, fc2.weight, fc2.weight_scale, fc2.bias, gamma, x, nw, eps),
                         nw)
        return residual_rms_norm(x, fp8_linear(u, su, fc2.weight, fc2.weight_scale, fc2.bias, h8.dtype), gamma, nw,
                                 eps, rowscale)  # drop path, as in attention_residual
    if rowscale is not None or _needs_grad(h, x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma, nw):
        return mlp_residual_norm(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma, x, nw, eps, rowscale)[:2]
    u = linear_gelu(h, fc1.weight, fc1.bias)
    return linear_residual_norm(u, fc2.weight, fc2.bias, gamma, x, nw, eps)


# --- the fused ops and their unfused alternatives ------------------------------------------------

def gelu_fused(a, weight, bias, config=None):
    a2 = rows_of(a)
    out = torch.empty((a2.shape[0], weight.shape[0]), dtype=a.dtype, device=a.device)
    linear_launch(a2, weight, bias, out, "gelu", config=config)
    return out.view(*a.shape[:-1], weight.shape[0])


def gelu_unfused(a, weight, bias):
    h = F.linear(a, weight, bias)  # cuBLAS
    return gelu_launch(h, h)  # in place: one read and one write of the hidden activation


@torch.library.custom_op("internvit_fast::linear_gelu", mutates_args=())
def linear_gelu(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU(a @ weight^T + bias) for a of shape (..., K): the fused GEMM, or cuBLAS + the GELU
    kernel where the tuned table measured that faster on this card."""
    m, (n, k) = a.numel() // max(1, a.shape[-1]), weight.shape
    if launch.choice("linear_gelu", Target.of(a.device), M=m, N=n, K=k, dtype=a.dtype) == "unfused":
        return gelu_unfused(a, weight, bias)
    return gelu_fused(a, weight, bias)


@linear_gelu.register_fake
def _(a, weight, bias):
    return a.new_empty((*a.shape[:-1], weight.shape[0]))


def residual_fused(a, weight, bias, gamma, x, norm_weight, eps, config=None):
    a2, x2 = rows_of(a), rows_of(x)
    x_new = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    linear_launch(a2, weight, bias, x_new, "residual", gamma=gamma, residual=x2, config=config)
    x_new = x_new.view(x.shape)
    h = rms_norm(x_new, norm_weight, eps) if norm_weight is not None else x.new_empty(0)
    return x_new, h


def residual_unfused(a, weight, bias, gamma, x, norm_weight, eps):
    return residual_rms_norm(x, F.linear(a, weight, bias), gamma, norm_weight, eps)


@torch.library.custom_op("internvit_fast::linear_residual_norm", mutates_args=())
def linear_residual_norm(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         gamma: Optional[torch.Tensor], x: torch.Tensor, norm_weight: Optional[torch.Tensor],
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h): x_new = x + gamma * (a @ weight^T + bias), h = RMSNorm(x_new) * norm_weight
    (empty without norm_weight). The GEMM's residual epilogue then rms_norm, or cuBLAS +
    residual_rms_norm where the tuned table measured that faster."""
    m, (n, k) = a.numel() // max(1, a.shape[-1]), weight.shape
    if launch.choice("linear_residual", Target.of(a.device), M=m, N=n, K=k, dtype=a.dtype) == "unfused":
        return residual_unfused(a, weight, bias, gamma, x, norm_weight, eps)
    return residual_fused(a, weight, bias, gamma, x, norm_weight, eps)


@linear_residual_norm.register_fake
def _(a, weight, bias, gamma, x, norm_weight, eps=1e-6):
    x_new = x.new_empty(x.shape)
    return x_new, (torch.empty_like(x_new) if norm_weight is not None else x.new_empty(0))


# --- training: the MLP half of a block, differentiable -------------------------------------

@torch.library.custom_op("internvit_fast::mlp_residual_norm", mutates_args=())
def mlp_residual_norm(h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                      b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor], x: torch.Tensor,
                      norm_weight: Optional[torch.Tensor], eps: float = 1e-6,
                      rowscale: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new, h_next, pre, y): x_new = x + s * gamma * fc2(GELU(fc1(h))), h_next =
    RMSNorm(x_new) * norm_weight (empty without norm_weight); fc1's pre-activation and fc2's
    output are returned for the backward to keep (callers ignore them). The block's MLP for
    training: differentiable, with the GELU's derivative applied in the epilogue of the GEMM
    that computes its gradient.

    Forward: cuBLAS fc1 (its output is the pre-activation the backward needs), the GELU kernel,
    cuBLAS fc2, residual_rms_norm (LayerScale, drop path's row scale, the next norm). Saved:
    h, the pre-activation, fc2's output y, x_new and the weights; the GELU's output is
    recomputed in the backward instead of kept (the reference keeps both).
    """
    pre = F.linear(h, w1, b1)
    y = F.linear(gelu(pre), w2, b2)
    x_new, h_next = residual_rms_norm(x, y, gamma, norm_weight, eps, rowscale)
    return x_new, h_next, pre, y


@mlp_residual_norm.register_fake
def _(h, w1, b1, w2, b2, gamma, x, norm_weight, eps=1e-6, rowscale=None):
    x_new = x.new_empty(x.shape)
    return (x_new, torch.empty_like(x_new) if norm_weight is not None else x.new_empty(0),
            h.new_empty((*h.shape[:-1], w1.shape[0])), x.new_empty(x.shape))


def _mlp_setup(ctx, inputs, output):
    h, w1, b1, w2, b2, gamma, x, norm_weight, eps, rowscale = inputs
    x_new, _, pre, y = output
    ctx.save_for_backward(h, w1, w2, pre, y, gamma, x_new, norm_weight, rowscale)
    ctx.eps, ctx.has_b1, ctx.has_b2 = eps, b1 is not None, b2 is not None


@torch.library.custom_op("internvit_fast::linear_gelu_grad", mutates_args=())
def linear_gelu_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(dy @ w2) * GELU'(pre) for dy (M, C), fc2's weight w2 (C, H), pre (M, H): the gradient of
    fc1's output, the derivative applied in the GEMM's epilogue."""
    return linear_launch(dy, w2, None, torch.empty_like(pre), "gelu_grad", pre=pre, weight_kn=True)


@linear_gelu_grad.register_fake
def _(dy, w2, pre):
    return torch.empty_like(pre)


def _mlp_backward(ctx, dx_new, dh_next, _dpre, _dy):
    h, w1, w2, pre, y, gamma, x_new, norm_weight, rowscale = ctx.saved_tensors
    from .rms_norm import residual_backward
    dx, dy, dgamma, dnw = residual_backward(x_new, y, gamma, norm_weight, rowscale, ctx.eps, dx_new, dh_next)
    dy2, pre2, h2 = rows_of(dy), rows_of(pre), rows_of(h)
    dpre = linear_gelu_grad(dy2, w2, pre2)
    u = gelu(pre2)  # recomputed, not kept
    dw2, db2 = dy2.t() @ u, dy2.sum(0) if ctx.has_b2 else None
    dh = (dpre @ w1).view(h.shape)
    dw1, db1 = dpre.t() @ h2, dpre.sum(0) if ctx.has_b1 else None
    return dh, dw1, db1, dw2, db2, dgamma, dx, dnw, None, None


mlp_residual_norm.register_autograd(_mlp_backward, setup_context=_mlp_setup)



# --- what the tools need to know (registry) ----------------------------------------------

def _candidates(epilogue: str):
    """Tuning candidates: (BLOCK_M, BLOCK_N, BLOCK_K, EPI_SPLIT, num_warps, num_stages, GROUP_M,
    extra settings). On sm_90 besides the tile shapes: two CTAs per SM (4 warps, 3 stages,
    under half the shared memory each, so one CTA's epilogue runs under the other's main
    loop) and, for fc1, the pipeliner's flattened tile loop (the next tile's loads issued
    during the epilogue). ``tools.gate --candidates`` builds them all for the card."""
    def cands(arch: str):
        two = dict(CTAS_PER_SM=2)
        flat = dict(FLATTEN=True)
        two_sk = dict(CTAS_PER_SM=2, STREAM_K=True)
        if arch == "smoke":
            rows = [(32, 32, 32, 2, 4, 1, 1, {}), (16, 32, 32, 1, 4, 1, 1, two_sk)]
        # sm_90: the default (two CTAs, stream-K) first, the same without stream-K, then one
        # hypothesis each: the GPU run's tuner box
        # (~45 s, a Triton JIT per candidate) reached about 15 candidates by the plan's
        # estimate, so variants the model cannot tell apart and that test nothing new
        # (GROUP_M 16, an unsplit epilogue, 128-deep K steps, 128x64 tiles) were dropped.
        elif arch == "sm90" and epilogue == "gelu":
            rows = [(128, 128, 64, 2, 4, 3, 8, two_sk), (128, 128, 64, 2, 4, 3, 8, two), (128, 256, 64, 2, 8, 3, 8, {}),
                    (128, 128, 64, 2, 8, 4, 8, {}), (64, 256, 64, 2, 4, 4, 8, {}), (128, 128, 64, 2, 8, 4, 8, flat)]
        elif arch == "sm90":  # (flattened, the residual epilogue spills in the loop)
            rows = [(128, 128, 64, 2, 4, 3, 8, two_sk), (128, 128, 64, 2, 4, 3, 8, two), (128, 128, 64, 2, 8, 4, 8, {}),
                    (64, 128, 64, 1, 4, 4, 8, {})]
        else:
            rows = [(128, 128, 32, 2, 8, 4, 8, {}), (128, 128, 64, 2, 8, 3, 8, {}), (128, 64, 32, 1, 4, 4, 8, {}),
                    (256, 128, 32, 2, 8, 3, 8, {})]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EPI_SPLIT=sp, num_warps=w, num_stages=s, GROUP_M=g, **x)
                for bm, bn, bk, sp, w, s, g, x in rows]
    return cands


def _gemm_dims(epilogue: str, variant: str, s: Shape) -> Tuple[int, int]:
    """(N, K) of the GEMM: fc1 (hidden, width), proj (width, width), fc2 (width, hidden); fc1's
    backward through fc2, (M, width) @ (width, hidden): (hidden, width)."""
    if epilogue in ("gelu", "gelu_grad"):
        return s.hidden, s.width
    return (s.width, s.width) if variant == "proj" else (s.width, s.hidden)


def _plan(epilogue: str, variant: str, s: Shape, target: Target, gamma: bool = True) -> LaunchPlan:
    """The launch of this GEMM at a shape, with contiguous operands (the fast path's)."""
    n, k = _gemm_dims(epilogue, variant, s)
    m = Meta.contiguous
    kn = epilogue == "gelu_grad"
    w = m((k, n) if kn else (n, k), s.dtype)
    vec = m((n,), s.dtype)
    x = m((s.rows, n), s.dtype) if epilogue in ("residual", "gelu_grad") else None
    return gemm.plan_linear(m((s.rows, k), s.dtype), w, m((s.rows, n), s.dtype), epilogue, target, x=x,
                            bias=None if kn else vec, gamma=vec if epilogue == "residual" and gamma else None,
                            weight_kn=kn)


def _plans(epilogue: str, variant: str):
    def plans(target: Target):
        out = [_plan(epilogue, variant, s, target) for s in registry.segmentation_shapes()]
        if epilogue == "residual":  # a model without LayerScale (init_values=0)
            out += [_plan(epilogue, variant, s, target, gamma=False) for s in registry.segmentation_shapes()]
        # and every configuration the card's table names for this GEMM (the tuned launches)
        for entry in target.table.get(TABLE_NAME[epilogue], []):
            sh = entry["shape"]
            dtype = {v: k for k, v in registry.DTYPE_NAMES.items()}[sh["dtype"]]
            shape = Shape(sh["M"], sh["K"] if epilogue != "residual" else sh["N"],
                          sh["N"] if epilogue != "residual" else sh["K"], dtype)
            if epilogue != "residual" or (variant == "proj") == (sh["K"] == sh["N"]):
                out.append(_plan(epilogue, variant, shape, target))
        return out
    return plans


def _plan_for(epilogue: str, variant: str):
    def plan_for(i: dict, target: Target) -> LaunchPlan:
        a = i["a"] if "a" in i else i["dy"]
        dtype = a.dtype
        if epilogue in ("gelu", "gelu_grad"):
            shape = Shape(a.shape[0], a.shape[1], i["pre"].shape[1] if "pre" in i else i["weight"].shape[0], dtype)
        else:
            n, k = i["weight"].shape
            shape = Shape(a.shape[0], n, k if variant == "fc2" else 4 * n, dtype)
        return _plan(epilogue, variant, shape, target)
    return plan_for


def _inputs(epilogue: str, variant: str):
    def make(s: Shape, device) -> dict:
        n, k = _gemm_dims(epilogue, variant, s)
        r = registry.rand
        inp = dict(a=r((s.rows, k), s.dtype, device), weight=r((n, k), s.dtype, device, k ** -0.5),
                   bias=r((n,), s.dtype, device, 0.5))
        if epilogue == "residual":
            inp.update(gamma=r((n,), s.dtype, device, 0.3), x=r((s.rows, n), s.dtype, device, 3.0),
                       norm_weight=r((n,), s.dtype, device, 1.0, 1.0), eps=1e-6)
        return inp
    return make


def _gelu_run(i, o, cfg):
    linear_launch(i["a"], i["weight"], i["bias"], o["y"], "gelu", config=cfg)


def _residual_run(i, o, cfg):
    linear_launch(i["a"], i["weight"], i["bias"], o["x_new"], "residual", gamma=i["gamma"], residual=i["x"],
                  config=cfg)


def _residual_pair_ref(i):
    x_new = linear_ref(i["a"], i["weight"], i["bias"], "residual", i["gamma"], i["x"])
    return {"x_new": x_new, "h": rms_norm_ref(x_new, i["norm_weight"], i["eps"])}


def _residual_pair(outputs):
    return lambda i, cfg=None: dict(zip(("x_new", "h"), outputs(i, cfg)))


GELU_SPEC = KernelSpec(
    name="linear_gelu",
    math="y = GELU(round(a @ w^T + b)), exact erf GELU (fc1)",
    promises_rounding=False,
    make_inputs=_inputs("gelu", ""),
    new_outputs=lambda i: {"y": registry.nan_like(i["a"], (i["a"].shape[0], i["weight"].shape[0]))},
    launch=_gelu_run,
    reference=lambda i: {"y": linear_ref(i["a"], i["weight"], i["bias"], "gelu")},
    plans=_plans("gelu", ""),
    plan_for=_plan_for("gelu", ""),
    candidates=_candidates("gelu"),
    choice=Choice(fused=lambda i, cfg=None: {"y": gelu_fused(i["a"], i["weight"], i["bias"], cfg)},
                  unfused=lambda i: {"y": gelu_unfused(i["a"], i["weight"], i["bias"])},
                  describe_unfused="cuBLAS fc1 + in-place GELU kernel"),
)


def _residual_spec(variant: str) -> KernelSpec:
    return KernelSpec(
        name="linear_residual",
        variant=variant,
        math="x_new = round(x + round(gamma * round(a @ w^T + b))) (proj, fc2)",
        promises_rounding=True,
        make_inputs=_inputs("residual", variant),
        new_outputs=lambda i: {"x_new": registry.nan_like(i["x"])},
        launch=_residual_run,
        reference=lambda i: {"x_new": linear_ref(i["a"], i["weight"], i["bias"], "residual", i["gamma"], i["x"])},
        plans=_plans("residual", variant),
        plan_for=_plan_for("residual", variant),
        candidates=_candidates("residual"),
        choice=Choice(
            fused=_residual_pair(lambda i, cfg: residual_fused(i["a"], i["weight"], i["bias"], i["gamma"], i["x"],
                                                               i["norm_weight"], i["eps"], cfg)),
            unfused=_residual_pair(lambda i, cfg: residual_unfused(i["a"], i["weight"], i["bias"], i["gamma"],
                                                                   i["x"], i["norm_weight"], i["eps"])),
            describe_unfused="cuBLAS + residual_rms_norm kernel (fused: residual epilogue + rms_norm)"),
        choice_reference=_residual_pair_ref,
    )


PROJ_SPEC = _residual_spec("proj")
FC2_SPEC = _residual_spec("fc2")


def _gelu_grad_inputs(s: Shape, device) -> dict:
    r = registry.rand
    return dict(dy=r((s.rows, s.width), s.dtype, device), w2=r((s.width, s.hidden), s.dtype, device, s.hidden ** -0.5),
                pre=r((s.rows, s.hidden), s.dtype, device, 2.0))


def _gelu_grad_ref(i: dict) -> dict:
    """The eager ops: fc2's input gradient (a matmul in the activation dtype), then GELU's backward."""
    return {"dpre": torch.ops.aten.gelu_backward(i["dy"] @ i["w2"], i["pre"])}


GELU_GRAD_SPEC = KernelSpec(
    name="linear_gelu_grad",
    training=True,
    math="d pre = (dy @ w2) * GELU'(pre): fc2's input gradient with GELU's derivative in the epilogue",
    promises_rounding=False,
    make_inputs=_gelu_grad_inputs,
    new_outputs=lambda i: {"dpre": registry.nan_like(i["pre"])},
    launch=lambda i, o, cfg: linear_launch(i["dy"], i["w2"], None, o["dpre"], "gelu_grad", pre=i["pre"],
                                           config=cfg, weight_kn=True),
    reference=_gelu_grad_ref,
    plans=_plans("gelu_grad", ""),
    plan_for=_plan_for("gelu_grad", ""),
    candidates=_candidates("gelu"),
)
