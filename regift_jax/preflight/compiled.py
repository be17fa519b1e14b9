"""What a compiled TPU executable says about itself: memory per chip, XLA's cost figures and the
collectives in its HLO; and what a failed compile says about the memory it wanted.

Every figure here is per chip (an SPMD executable is the program of one device).  Costs add and
scale (:class:`Cost`), so the costs of differently sized variants of one program can be combined
into the cost of the real one (:mod:`regift_jax.preflight.estimate`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# "Moved" bytes per chip per byte of the largest buffer of a collective over n chips (ring
# algorithms): all-gather and reduce-scatter pass (n-1)/n of it, all-reduce twice that.
_RING_FACTOR = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
                "all-reduce": 2.0, "collective-permute": None}


@dataclasses.dataclass
class Collective:
    """Collectives of one kind in a program: how many appear, their bytes and the bytes each
    chip sends over the interconnect (ring algorithms)."""
    count: float = 0.0
    bytes: float = 0.0
    moved_bytes: float = 0.0

    def scaled(self, k: float) -> "Collective":
        return Collective(self.count * k, self.bytes * k, self.moved_bytes * k)

    def plus(self, other: "Collective") -> "Collective":
        return Collective(self.count + other.count, self.bytes + other.bytes,
                          self.moved_bytes + other.moved_bytes)


@dataclasses.dataclass
class Cost:
    """XLA's cost figures of one program per chip, and its collectives by kind.

    ``xla_seconds`` is the cost model's time (:func:`xla_seconds`; NaN when it gave none)."""
    flops: float = 0.0
    bytes: float = 0.0
    xla_seconds: float = 0.0
    collectives: Dict[str, Collective] = dataclasses.field(default_factory=dict)

    def scaled(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k, self.xla_seconds * k,
                    {n: c.scaled(k) for n, c in self.collectives.items()})

    def plus(self, other: "Cost") -> "Cost":
        kinds = sorted(set(self.collectives) | set(other.collectives))
        coll = {n: self.collectives.get(n, Collective()).plus(
            other.collectives.get(n, Collective())) for n in kinds}
        return Cost(self.flops + other.flops, self.bytes + other.bytes,
                    self.xla_seconds + other.xla_seconds, coll)

    def minus(self, other: "Cost") -> "Cost":
        return self.plus(other.scaled(-1.0))

    @property
    def moved_bytes(self) -> float:
        return sum(c.moved_bytes for c in self.collectives.values())


def _array_bytes(text: str) -> List[float]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m and m.group(1):
        return len(m.group(1).split(","))
    return num_devices


def collectives(hlo_text: str, num_devices: int) -> Dict[str, Collective]:
    """Every collective instruction of an HLO module's text, by kind (an async ``-start`` /
    ``-done`` pair counts once).  Instructions inside loop bodies are counted once, as written."""
    out: Dict[str, Collective] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        kind = m.group(2)
        sizes = _array_bytes(m.group(1))
        size = max(sizes) if sizes else 0.0
        n = max(_group_size(line, num_devices), 1)
        factor = _RING_FACTOR[kind]
        moved = size if factor is None else factor * size * (n - 1) / n
        c = out.setdefault(kind, Collective())
        c.count += 1
        c.bytes += size
        c.moved_bytes += moved
    return out


def xla_seconds(optimal: float) -> float:
    """The time in XLA's ``optimal_seconds``.  The TPU cost model adds -1 s for each operation it
    cannot time (a straight-line LoRA step has one: -0.9997 s where its other operations take
    0.3 ms; full fine-tuning two), so a negative value is read as its fractional part: right for
    a program that runs in under a second, as the preflight's costing pieces do (the estimate
    checks the result against the FLOP roofline)."""
    if not math.isfinite(optimal):
        return float("nan")
    return optimal - math.floor(optimal) if optimal < 0 else optimal


def cost(compiled, num_devices: int) -> Cost:
    """The executable's :class:`Cost` (XLA's cost analysis and its HLO's collectives)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
        ca = ca[0] if ca else {}
    return Cost(flops=float(ca.get("flops", 0.0)), bytes=float(ca.get("bytes accessed", 0.0)),
                xla_seconds=xla_seconds(float(ca.get("optimal_seconds", float("nan")))),
                collectives=collectives(compiled.as_text(), num_devices))


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ``ShapeDtypeStruct`` s (its largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


# ============================================================================ failed compiles
_SIZE = re.compile(r"([0-9.]+)([KMGT]?)(?:i?B)?\b")
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _to_bytes(text: str) -> Optional[float]:
    m = _SIZE.match(text.strip())
    return float(m.group(1)) * _UNIT[m.group(2)] if m else None


def is_out_of_memory(err: BaseException) -> bool:
    s = str(err)
    return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "exceeds available" in s


def out_of_memory(err: BaseException) -> Tuple[Optional[float], Optional[float], List[str]]:
    """(bytes the program needed, bytes available, its largest allocations as lines) from the
    message of a compile that ran out of HBM; None where the message does not say."""
    s = str(err)
    need = have = None
    m = re.search(r"Used ([0-9.]+[KMGT]?) of ([0-9.]+[KMGT]?) hbm", s)
    if m:
        need, have = _to_bytes(m.group(1)), _to_bytes(m.group(2))
    m = re.search(r"\(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)", s)
    if m and need is None:
        need, have = _to_bytes(m.group(1)), _to_bytes(m.group(2))
    return need, have, largest_allocations(s)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+([a-z-]+)\(")
_NOT_BUFFERS = ("bitcast", "get-tuple-element", "tuple", "constant", "copy-done",
                "collective-permute-done", "all-gather-done", "all-reduce-done")


def largest_buffers(hlo_text: str, limit: int = 5) -> List[str]:
    """The largest arrays of a compiled (per-device) HLO module, one line each: size, shape and
    the JAX operation that made it; the entry's parameters are the program's arguments.  Fused
    computations' insides are not buffers and are skipped."""
    found, comp_name, entry = {}, "", False
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%(\S+)\s*\(.*\{\s*$", line)
        if head:
            comp_name, entry = head.group(2), bool(head.group(1))
            continue
        m = _INSTR.match(line)
        if not m or "fused" in comp_name or m.group(4) in _NOT_BUFFERS:
            continue
        if m.group(4) == "parameter" and not entry:
            continue
        size = _array_bytes(f"{m.group(2)}[{m.group(3)}]")
        op = re.search(r'op_name="([^"]+)"', line)
        what = "argument" if m.group(4) == "parameter" else (
            "/".join(op.group(1).split("/")[-3:]) if op else m.group(4))
        key = (m.group(2), m.group(3), what)
        if size and key not in found:
            found[key] = size[0]
    top = sorted(found.items(), key=lambda kv: -kv[1])[:limit]
    return [f"{b / 2**30:.2f} GiB {t}[{d}] ({w})" for (t, d, w), b in top]


def largest_allocations(message: str, limit: int = 5) -> List[str]:
    """The compiler's "Largest program allocations" as one line each: size, shape, operation."""
    out = []
    for block in re.split(r"\n\s*\d+\.\s+Size:", message)[1:limit + 1]:
        size = block.strip().splitlines()[0].strip()
        shape = re.search(r"Shape:\s*(\S+)", block)
        op = re.search(r'op_name="([^"]+)"', block)
        label = re.search(r"XLA label:\s*(.+)", block)
        what = op.group(1) if op else (label.group(1).strip()[:100] if label else "?")
        out.append(f"{size} {shape.group(1) if shape else '?'} ({what})")
    return out
