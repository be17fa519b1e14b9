"""Checkpoints of the train state and the data iterator; the SIGTERM (preemption) flag.

orbax ``CheckpointManager`` in ``<workdir>/checkpoints``: every ``checkpoint.every_steps``, at
the end and on SIGTERM; ``keep`` most recent; async (the device-to-host copy happens before
``save`` returns, so donating the state afterwards is safe); atomic (orbax writes a temporary
directory and renames it on commit, so a killed save leaves no step behind).  The data
iterator's JSON state of every process is written, atomically, *before* the orbax save to
``<workdir>/data_state/<step>/process_<i>.json``.  A checkpoint is only written from a state whose
trainable params are all finite.  Resume restores the newest step whose state and data files
read back (and whose params are finite); an unreadable one is moved to
``<workdir>/checkpoints_unreadable/`` with a warning and the previous one is used; when none is
left the log says "no usable checkpoint: starting from step 0".

SIGTERM (preemption): the handler only sets a flag; the loop saves at the current step, waits for
the write to finish and returns normally (the command exits 0).  With several processes the flag
is OR-reduced across processes each step so all stop at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from regift_jax.core.io import atomic_write_json
from regift_jax.training.hosts import host_max
from regift_jax.training.state import TrainState, all_finite

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DATA_STATE_DIR = "data_state"
UNREADABLE_DIR = "checkpoints_unreadable"


def steps_on_disk(workdir: str) -> List[int]:
    """The committed checkpoint steps in ``<workdir>/checkpoints`` (orbax names a committed step
    by its number; unfinished saves carry a suffix), read without orbax."""
    d = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def step_signature(workdir: str, step: int) -> Dict[str, int]:
    """``{relative file name: size}`` of checkpoint ``step`` (its state and its data-iterator
    files): a checkpoint changed, truncated or removed since it was written no longer matches."""
    root = os.path.abspath(workdir)
    out: Dict[str, int] = {}
    for sub in (os.path.join(CHECKPOINT_DIR, str(step)), os.path.join(DATA_STATE_DIR, str(step))):
        for dirpath, _, files in os.walk(os.path.join(root, sub)):
            for fn in files:
                path = os.path.join(dirpath, fn)
                out[os.path.relpath(path, root)] = os.path.getsize(path)
    return dict(sorted(out.items()))


class Checkpointer:
    """orbax CheckpointManager for the TrainState + per-process data-iterator JSON."""

    def __init__(self, workdir: str, ccfg, finite_fn: Callable = all_finite):
        self.finite_fn = finite_fn
        self.workdir = workdir
        self.dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.data_dir = os.path.join(os.path.abspath(workdir), DATA_STATE_DIR)
        self.keep = int(ccfg.keep)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep if self.keep > 0 else None,
            enable_async_checkpointing=bool(ccfg.async_save), create=True)
        self.mgr = ocp.CheckpointManager(self.dir, options=opts, item_names=("state",))

    def steps(self) -> List[int]:
        self.mgr.reload()
        return sorted(self.mgr.all_steps())

    def _data_path(self, step: int, pid: Optional[int] = None) -> str:
        pid = jax.process_index() if pid is None else pid
        return os.path.join(self.data_dir, str(step), f"process_{pid}.json")

    def save(self, step: int, state: TrainState, data_state: dict, extra: dict) -> bool:
        if not bool(jax.device_get(self.finite_fn(state.params))):
            log.error("step %d: trainable params are not finite; checkpoint NOT saved", step)
            return False
        if step in self.mgr.all_steps():
            return True
        atomic_write_json(self._data_path(step), {"data": data_state, **extra}, indent=None)
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=True)
        self._gc_data()
        return True

    def _gc_data(self):
        if not os.path.isdir(self.data_dir):
            return
        # Keep data states of kept steps and of any step newer than them (in flight).
        kept = set(self.mgr.all_steps())
        newest = max(kept) if kept else -1
        for name in os.listdir(self.data_dir):
            if name.isdigit() and int(name) not in kept and int(name) < newest:
                shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

    def wait(self):
        self.mgr.wait_until_finished()

    def _read(self, step: int, abstract_state) -> Tuple[TrainState, dict]:
        r = self.mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        state = r.state
        with open(self._data_path(step)) as f:
            data = json.load(f)
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"state.step={int(jax.device_get(state.step))} != {step}")
        if not bool(jax.device_get(self.finite_fn(state.params))):
            raise ValueError("restored params are not finite")
        return state, data

    def restore(self, abstract_state) -> Optional[Tuple[int, TrainState, dict]]:
        """Newest readable checkpoint: (step, state, data JSON) or None when there is none."""
        steps = sorted(self.steps(), reverse=True)
        for step in steps:
            try:
                state, data = self._read(step, abstract_state)
                return step, state, data
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to "
                            "the previous one", step, self.dir, type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "")
                self._quarantine(step)
        if steps:
            log.warning("no usable checkpoint: starting from step 0 (the %d unreadable ones are "
                        "in %s)", len(steps),
                        os.path.join(os.path.abspath(self.workdir), UNREADABLE_DIR))
        return None

    def _quarantine(self, step: int):
        """Move an unreadable step out of orbax's way (kept for inspection)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}_a")
        if jax.process_index() == 0:
            dst = os.path.join(os.path.abspath(self.workdir), UNREADABLE_DIR)
            os.makedirs(dst, exist_ok=True)
            tag = time.strftime("%Y%m%d-%H%M%S")
            src = os.path.join(self.dir, str(step))
            if os.path.exists(src):
                shutil.move(src, os.path.join(dst, f"{step}.{tag}"))
            d = os.path.join(self.data_dir, str(step))
            if os.path.exists(d):
                shutil.move(d, os.path.join(dst, f"{step}.{tag}.data_state"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}_b")
        self.mgr.reload()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


class Preemption:
    """SIGTERM sets a flag (installed from the main thread only); :meth:`requested` is true on
    every process once any process got the signal."""

    def __init__(self):
        self.flag = threading.Event()
        self._old = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.flag.set()

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def requested(self) -> bool:
        local = self.flag.is_set()
        if jax.process_count() == 1:
            return local
        return host_max(int(local)) > 0
