"""Multi-host start-up shared by every command line: ``jax.distributed.initialize`` from a config
section and the environment.

The section (``config.distributed`` of training and of evaluation) has the keys
``initialize`` (``auto`` | ``always`` | ``never``), ``coordinator_address``, ``num_processes``,
``process_id`` and ``initialization_timeout``; empty / negative values fall back to the
environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``,
so one launcher line starts either command.  ``auto`` initialises when a coordinator address is
known or a multi-host TPU environment is detected (Cloud TPU pods auto-detect everything else).
On CPU the cross-process collectives are gloo (JAX's default).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)

INITIALIZE = ("auto", "always", "never")


class DistributedConfigError(ValueError):
    """A ``distributed`` section or environment variable that cannot be used."""


def tpu_multihost_env() -> bool:
    """Whether this process runs on a multi-host Cloud TPU slice."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _setting(value, env_name: str, minimum: int) -> int:
    """``value`` when it is at least ``minimum`` (set in the config), else the environment
    variable ``env_name`` (-1 when unset)."""
    if int(value) >= minimum:
        return int(value)
    raw = os.environ.get(env_name) or "-1"
    try:
        return int(raw)
    except ValueError:
        raise DistributedConfigError(f"{env_name}={raw!r} is not an integer") from None


def distributed_kwargs(dcfg) -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments of ``dcfg``, or None when it should not run
    (``never``, or ``auto`` without a coordinator address outside a multi-host TPU slice)."""
    mode = str(dcfg.initialize)
    if mode not in INITIALIZE:
        raise DistributedConfigError(f"distributed.initialize={mode!r}; valid: "
                                     f"{', '.join(INITIALIZE)}")
    addr = dcfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if mode == "never" or (mode == "auto" and not addr and not tpu_multihost_env()):
        return None
    nproc = _setting(dcfg.num_processes, "JAX_NUM_PROCESSES", 1)
    pid = _setting(dcfg.process_id, "JAX_PROCESS_ID", 0)
    kw = {"initialization_timeout": int(dcfg.initialization_timeout)}
    if addr:
        kw["coordinator_address"] = addr
    if nproc > 0:
        kw["num_processes"] = nproc
    if pid >= 0:
        kw["process_id"] = pid
    return kw


def maybe_initialize_distributed(dcfg) -> bool:
    """``jax.distributed.initialize`` per :func:`distributed_kwargs`; returns whether it ran.
    Must run before anything touches a JAX backend."""
    kw = distributed_kwargs(dcfg)
    if kw is None:
        return False
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
