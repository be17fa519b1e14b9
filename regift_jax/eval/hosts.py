"""Multi-host evaluation: every process scores a contiguous share of the items; the shares are
gathered on every process (so all of them build the same report) and process 0 writes the files.

Initialisation: ``python -m regift_jax.evaluate`` calls
:func:`regift_jax.core.distributed.maybe_initialize_distributed` (the training command line's)
on the evaluation config's ``distributed`` section, which has the training section's keys and
environment variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
so one launcher line starts either.  In-process callers (the experiment) run under whatever the
training command line initialised.

Each process loads the whole model on its own devices (``runtime.mesh`` spans the local
devices), so the shares need no cross-process collective until :func:`gather`, which moves the
per-item results (JSON) with ``multihost_utils.process_allgather``.  An expected error on any
process (:func:`gather_or_raise`) is raised on every process, so no process waits forever in a
collective that another one never reaches.
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from regift_jax.eval.config import InputError


def is_writer() -> bool:
    """Whether this process writes the output files (process 0)."""
    return jax.process_index() == 0


def share(n: int) -> Tuple[int, int]:
    """``(start, stop)`` of this process's contiguous share of ``n`` items (all of them on one
    process; the shares of consecutive processes are consecutive and differ by at most one)."""
    p, count = jax.process_index(), jax.process_count()
    return p * n // count, (p + 1) * n // count


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def gather(obj: Any) -> List[Any]:
    """Every process's ``obj`` (JSON-serialisable), in process order, on every process.  On one
    process: ``[obj]`` itself (no copy, no round trip)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj, default=_json_default).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(rows[p, :int(sizes[p, 0])]).decode("utf-8"))
            for p in range(rows.shape[0])]


def gather_or_raise(fn: Callable[[], Any]) -> List[Any]:
    """:func:`gather` of ``fn()``; an expected error (``ValueError``, :class:`InputError`
    included) on any process becomes an :class:`InputError` on every process."""
    try:
        part = {"ok": fn()}
    except ValueError as e:
        if jax.process_count() == 1:
            if isinstance(e, InputError):
                raise
            raise InputError(str(e)) from e
        part = {"error": f"process {jax.process_index()}: {e}"}
    parts = gather(part)
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        raise InputError(errors[0])
    return [p["ok"] for p in parts]


def agree(error: Optional[str]) -> None:
    """Raise :class:`InputError` on every process when any process found ``error``."""
    errors = [e for e in gather(error) if e]
    if errors:
        raise InputError(errors[0])
