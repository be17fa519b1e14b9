"""Multi-host evaluation: every process scores a contiguous share of the items; the shares are
gathered on every process (so all of them build the same report) and process 0 writes the files.

Initialisation (:func:`maybe_initialize_distributed`, called by ``python -m regift_jax.evaluate``
before any JAX work) reads the evaluation config's ``distributed`` section, which has the keys and
environment variables of the training command line (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; ``initialize = auto | always | never``; a multi-host
TPU environment is detected), so one launcher line starts either.  In-process callers (the
experiment) run under whatever the training command line initialised.

Each process loads the whole model on its own devices (``runtime.mesh`` spans the local
devices), so the shares need no cross-process collective until :func:`gather`, which moves the
per-item results (JSON) with ``multihost_utils.process_allgather``.  An expected error on any
process (:func:`gather_or_raise`) is raised on every process, so no process waits forever in a
collective that another one never reaches.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from regift_jax.eval.config import CHOICES, InputError

log = logging.getLogger("regift_jax.evaluate")

INITIALIZE = CHOICES["distributed.initialize"]


def _tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def distributed_kwargs(dcfg) -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments of ``dcfg``, or None when it should not run
    (``never``, or ``auto`` without a coordinator address and outside a TPU pod)."""
    mode = str(dcfg.initialize)
    if mode not in INITIALIZE:
        raise InputError(f"distributed.initialize={mode!r}; valid: {', '.join(INITIALIZE)}")
    env = os.environ
    addr = dcfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    if mode == "never" or (mode == "auto" and not addr and not _tpu_pod()):
        return None
    try:
        nproc = int(dcfg.num_processes) if int(dcfg.num_processes) > 0 else int(
            env.get("JAX_NUM_PROCESSES") or 0)
        pid = int(dcfg.process_id) if int(dcfg.process_id) >= 0 else int(
            env.get("JAX_PROCESS_ID") or -1)
    except ValueError as e:
        raise InputError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID: {e}") from None
    kw = {"initialization_timeout": int(dcfg.initialization_timeout)}
    if addr:
        kw["coordinator_address"] = addr
    if nproc > 0:
        kw["num_processes"] = nproc
    if pid >= 0:
        kw["process_id"] = pid
    return kw


def maybe_initialize_distributed(dcfg) -> bool:
    """``jax.distributed.initialize`` per :func:`distributed_kwargs`; whether it ran.  Must run
    before anything touches a JAX backend."""
    kw = distributed_kwargs(dcfg)
    if kw is None:
        return False
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


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
            raise e if isinstance(e, InputError) else InputError(str(e)) from None
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
