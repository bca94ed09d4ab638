"""Run the fp32 arithmetic of a compiled elementwise PTX function on CPU, bit for bit.

The compile gate uses it to show that two Triton functions of one fp32 value compile to code
that gives the same bits for every input it is given (kernels/gelu.py: the GELU epilogue's
erf against libdevice's ``erff``). The interpreter cannot show this: it evaluates
``tl.fma`` with two roundings and knows nothing of the PTX the GPU runs.

A probe kernel loads one fp32 per thread, applies the function and stores the result, so
its PTX is straight-line code with forward branches. ``evaluate`` runs that code over a
numpy array of inputs, one lane per input, with a mask of active lanes (a forward branch
parks the lanes that take it until its label). Each instruction is rounded as PTX defines
it: ``fma.rn`` and ``add``/``sub``/``mul`` once, to nearest even (float64 arithmetic, an
error-free sum for what float64 dropped, rounding to odd before the one rounding to fp32),
``.ftz`` flushing subnormal inputs and results; other modifiers (``.sat``, ``.rz``, ...)
are refused, and so is any load but the probe's one value. One thing is
not the GPU's: ``ex2.approx`` is the correctly rounded 2^t here, the MUFU's bits elsewhere;
two programs that reach it with the same t get the same bits from both, which is all a
comparison of two programs needs. An opcode it does not know is an error that names it,
and a ``mul.f32`` without ``.rn`` whose result (or its mov or neg) feeds an add (ptxas may
fuse the two into an fma, so its rounding is not fixed) is refused.
"""
from __future__ import annotations

import re
from typing import Dict, List

import numpy as np

__all__ = ["evaluate", "PtxError"]


class PtxError(ValueError):
    pass


_TINY = np.float32(np.finfo(np.float32).tiny)


def _f32(bits: np.ndarray) -> np.ndarray:
    if bits.dtype != np.uint32:
        raise PtxError(f"a {bits.dtype} register used as an fp32 value")
    return bits.view(np.float32)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _ftz(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < _TINY, np.copysign(np.float32(0), x), x).astype(np.float32)


def _round32(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Round the exact value s + err (s = the float64 rounding of it, err exact) to fp32 once.
    Float64 then fp32 would round twice; rounding to odd first does not: where err is not
    zero and s's last bit is even, s steps one float64 ulp towards the exact value, after
    which one round-to-nearest-even to fp32 is the correct rounding (53 >= 24 + 2 bits), the
    overflow edge and subnormals included."""
    with np.errstate(over="ignore", invalid="ignore"):
        nudge = (err != 0) & ((s.view(np.uint64) & np.uint64(1)) == 0)
        s = np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def _sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """fp32(a + b) for float64 a, b, rounded once (Knuth's two-sum gives the float64 error)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
        err = np.where(np.isfinite(s), err, 0.0)
    return _round32(s, err)


def fma_f32(a, b, c):
    return _sum(a.astype(np.float64) * b.astype(np.float64), c.astype(np.float64))  # the product is exact


def _ex2(t):
    with np.errstate(over="ignore", under="ignore"):
        return np.exp2(t.astype(np.float64)).astype(np.float32)


_CMP = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal,
        "ne": lambda a, b: np.not_equal(a, b) & ~np.isnan(a) & ~np.isnan(b)}  # PTX's ne is ordered
# The modifiers an fp32 instruction may carry here; any other (.sat, .rz/.rm/.rp, .full, ...)
# changes the result and is refused rather than read as round-to-nearest.
_F32_MODIFIERS = {"rn", "ftz", "f32", "approx"}

_LINE = re.compile(r"^(@!?%\w+\s+)?([\w.]+)\s*(.*?);$")


def _body(ptx: str) -> List[str]:
    """The entry function's instructions and labels, comments and debug directives dropped."""
    start = ptx.index(".entry")
    body = ptx[ptx.index("{", ptx.index(")", start)) + 1:]
    lines = []
    for raw in body.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line.startswith("."):
            continue
        if line == "}":
            break
        lines.append(line)
    return lines


def evaluate(ptx: str, x: np.ndarray) -> np.ndarray:
    """The fp32 value the probe's PTX stores, for each fp32 in ``x`` as the value it loads."""
    with np.errstate(all="ignore"):  # inf * 0 and the like are values here, not mistakes
        return _evaluate(ptx, np.asarray(x, dtype=np.float32))


def _evaluate(ptx: str, x: np.ndarray) -> np.ndarray:
    lines = _body(ptx)
    regs: Dict[str, np.ndarray] = {}
    n = len(x)
    active = np.ones(n, dtype=bool)
    parked: Dict[str, np.ndarray] = {}
    out = None
    loaded = False

    def val(op: str) -> np.ndarray:
        """A register's or an immediate's value: 32-bit values as their bits (uint32), predicates bool."""
        op = op.strip()
        if op.startswith("0f"):
            return np.full(n, int(op[2:], 16), dtype=np.uint32)
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", op):
            return np.full(n, int(op, 0) & 0xFFFFFFFF, dtype=np.uint32)
        if op not in regs:
            raise PtxError(f"register {op} read before it is written")
        return regs[op]

    def put(dst: str, v: np.ndarray) -> None:
        """Write the active lanes (a parked lane keeps what it had)."""
        if v.dtype == np.float32:
            v = _bits(v)
        old = regs.get(dst)
        regs[dst] = v if old is None or old.dtype != v.dtype else np.where(active, v, old)

    fed_by_mul = set()
    for i, line in enumerate(lines):
        if line.endswith(":"):
            label = line[:-1]
            if label in parked:
                active = active | parked.pop(label)
            continue
        m = _LINE.match(line)
        if not m:
            raise PtxError(f"cannot read the PTX line {line!r}")
        guard, opcode, rest = m.group(1), m.group(2), m.group(3)
        ops = [o.strip() for o in rest.split(",")] if rest else []
        parts = opcode.split(".")
        base = parts[0]
        if base in ("mov", "neg") and fed_by_mul & set(ops[1:]):
            fed_by_mul.add(ops[0])  # a mul's value moved on is still a mul's to ptxas
        if guard is not None:
            g = val(guard.strip()[1:].lstrip("!"))
            taken = active & (~g if "!" in guard else g)
        else:
            taken = active
        if base == "bra":
            target = ops[0]
            if target not in [ln[:-1] for ln in lines[i + 1:] if ln.endswith(":")]:
                raise PtxError(f"a backward or unknown branch to {target}: not a straight-line probe")
            parked[target] = parked.get(target, np.zeros(n, dtype=bool)) | taken
            active = active & ~taken
            continue
        if guard is not None:
            raise PtxError(f"a predicated {opcode} is not modelled")
        if base == "ret":
            break
        dtype = parts[-1]
        ftz = "ftz" in parts
        addressing = base not in ("ld", "st") and (dtype in ("b64", "u64", "s64") or any(o.startswith("%tid") for o in ops)
                                                  or (ops and ops[0].startswith("%rd")))
        if base == "ld" and "global" in parts:
            if loaded or dtype not in ("b32", "f32"):
                raise PtxError(f"the probe loads one fp32 per thread, got {line!r}")
            put(ops[0].strip("{} "), x.astype(np.float32))
            loaded = True
            continue
        if base == "st" and "global" in parts:
            if out is not None or dtype not in ("b32", "f32"):
                raise PtxError(f"the probe stores one fp32 per thread, got {line!r}")
            src = rest[rest.index("{") + 1:rest.index("}")].strip()
            out = val(src)
            continue
        integer = {"u32", "s32", "u64", "s64", "b32", "b64"}
        if (opcode == "ld.param.b64" or (base == "mad" and set(parts[1:]) <= integer | {"wide", "lo"})
                or (base == "cvt" and set(parts[1:]) <= integer and {"u64", "s64", "b64"} & set(parts))
                or addressing or (base in ("and", "shl") and not loaded)):
            continue  # address arithmetic: the probe's pointers, not its values
        if base in ("add", "sub", "mul", "fma", "abs", "neg", "ex2", "setp") and dtype == "f32":
            odd = set(parts[1:]) - _F32_MODIFIERS - ({parts[1]} if base == "setp" else set())
            if odd:
                raise PtxError(f"{line!r}: the modifier(s) {sorted(odd)} are not modelled")
            a = [_f32(val(o)) for o in ops[1:]]
            if ftz:
                a = [_ftz(v) for v in a]
            if base == "setp":
                cmp = parts[1]
                unordered = cmp.endswith("u") and cmp not in ("nu",)
                fn = _CMP.get(cmp[:-1] if unordered else cmp)
                if fn is None:
                    raise PtxError(f"setp comparison {cmp} is not modelled")
                with np.errstate(invalid="ignore"):
                    r = fn(a[0], a[1])
                if unordered:
                    r = r | np.isnan(a[0]) | np.isnan(a[1])
                put(ops[0], r)
                continue
            if base in ("add", "sub") and any(o in fed_by_mul for o in ops[1:]):
                raise PtxError(f"{line!r}: adds a mul.f32 without .rn, which ptxas may contract into an fma")
            if base == "mul" and "rn" not in parts:
                fed_by_mul.add(ops[0])
            if base == "add":
                r = _sum(a[0].astype(np.float64), a[1].astype(np.float64))
            elif base == "sub":
                r = _sum(a[0].astype(np.float64), -a[1].astype(np.float64))
            elif base == "mul":
                r = _round32(a[0].astype(np.float64) * a[1].astype(np.float64), np.zeros(n))
            elif base == "fma":
                if "rn" not in parts:
                    raise PtxError(f"{line!r}: an fma without .rn")
                r = fma_f32(*a)
            elif base == "abs":
                r = np.abs(a[0])
            elif base == "neg":
                r = -a[0]
            else:
                if "approx" not in parts:
                    raise PtxError(f"{line!r}: only ex2.approx is modelled")
                r = _ex2(a[0])
            put(ops[0], _ftz(r) if ftz else r.astype(np.float32))
            continue
        if base == "copysign" and dtype == "f32":  # PTX: d = b with the sign of a
            sign, mag = val(ops[1]), val(ops[2])
            put(ops[0], (mag & np.uint32(0x7FFFFFFF)) | (sign & np.uint32(0x80000000)))
            continue
        if base == "mov" and len(ops) == 2:
            put(ops[0], val(ops[1]))
            continue
        if base == "selp":
            put(ops[0], np.where(val(ops[3]), val(ops[1]), val(ops[2])))
            continue
        if base in ("and", "or", "xor") and dtype in ("b32", "pred"):
            a, b = val(ops[1]), val(ops[2])
            if dtype == "pred":
                put(ops[0], {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[base](a, b))
            else:
                put(ops[0], {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[base](a, b))
            continue
        raise PtxError(f"the opcode {opcode} ({line!r}) is not modelled")
    if out is None:
        raise PtxError("the probe's PTX stores nothing")
    if parked:
        raise PtxError(f"branches to labels never reached: {sorted(parked)}")
    return _f32(out)
