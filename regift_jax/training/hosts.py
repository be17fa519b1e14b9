"""Multi-host helpers of the training stage: agreeing on a number across processes and
gathering a sharded array to every host."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def host_max(v: int) -> int:
    """The largest ``v`` over all processes (``v`` itself on one process)."""
    if jax.process_count() == 1:
        return int(v)
    return int(np.max(multihost_utils.process_allgather(np.asarray(v, np.int64))))


def host_min(v: int) -> int:
    return -host_max(-int(v))
