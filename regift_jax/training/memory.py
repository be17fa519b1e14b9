"""The trainer's memory check, before its first step on a device that reports its memory (TPU,
GPU): the train step is compiled ahead of time (the compile its first call would do anyway), its
memory per device, from the compiler, is compared with the device's, and a step that does not
fit is refused with what would: the largest micro-batch whose activations fit by the compiler's
own figures, a remat policy, or more shards for the state.  The TPU preflight
(:mod:`regift_jax.preflight`) makes the same check before a slice exists."""

from __future__ import annotations

from typing import List, Optional

from regift_jax.core.memory import Memory

#: Share of the device's memory a suggestion may plan to use (fragmentation, runtime buffers).
PLAN_FRACTION = 0.9
GIB = 1024 ** 3


class StepMemoryError(RuntimeError):
    """The compiled train step needs more memory per device than the device has."""


def fitting_micro_batch(mem: Memory, limit: int, *, rows: int, global_batch: int,
                        batch_shards: int, accum_bytes: int) -> Optional[int]:
    """The largest micro-batch (rows over all devices) below ``rows`` that divides
    ``global_batch``, splits over the batch shards and fits: the temporaries (activations) scale
    with the rows of a micro-batch, the arguments and outputs do not; accumulating gradients adds
    ``accum_bytes`` (a float32 copy of what trains) when the step did not accumulate before."""
    fixed = mem.total - mem.temporaries + accum_bytes
    per_row = mem.temporaries / max(rows, 1)
    for m in range(rows - 1, 0, -1):
        if global_batch % m == 0 and m % batch_shards == 0 and \
                fixed + per_row * m <= PLAN_FRACTION * limit:
            return m
    return None


def check(mem: Memory, limit: int, *, rows: int, global_batch: int, batch_shards: int,
          accum_bytes: int, remat_policy: str) -> str:
    """A one-line summary when the step fits ``limit`` bytes per device; otherwise
    :class:`StepMemoryError` with the figures and what would fit."""
    line = (f"train step needs {mem.total / GIB:.2f} GiB per device of {limit / GIB:.2f} "
            f"(arguments {mem.arguments / GIB:.2f}, temporaries {mem.temporaries / GIB:.2f}; "
            f"micro-batch {rows} rows)")
    if mem.total <= limit:
        return line
    tips: List[str] = []
    state = mem.total - mem.temporaries
    if state > PLAN_FRACTION * limit:
        tips.append("shard the state over more devices (--config.mesh.fsdp=-1, "
                    "--config.mesh.data=1) or use LoRA: the state alone does not fit")
    else:
        m = fitting_micro_batch(mem, limit, rows=rows, global_batch=global_batch,
                                batch_shards=batch_shards, accum_bytes=accum_bytes)
        if m:
            tips.append(f"--config.train.micro_batch={m} ({global_batch // m} micro-batches "
                        f"accumulated per step; the same optimizer step)")
        if remat_policy not in ("full", "nothing_saveable"):
            tips.append("--config.model.remat_policy=full (recompute each layer's activations "
                        "in the backward pass)")
    raise StepMemoryError(f"the train step does not fit: {line}. Try: "
                          + ("; or ".join(tips) or "a larger slice"))
