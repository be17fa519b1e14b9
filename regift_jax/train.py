"""Command line: fine-tune a student on ReGiFT traces (or the Instruction baseline).

    python -m regift_jax.train --config=configs/llama.py --config.workdir=/tmp/run
    python -m regift_jax.train --config=configs/llama.py:llama3_1_8b --workdir=gs://... \\
        --config.optim.learning_rate=1e-4 --config.train.num_epochs=3
    python -m regift_jax.train --config=configs/instruction.py:smollm2_135m --workdir=/tmp/inst

Flags: ``--config`` (an ``ml_collections`` config file with an optional ``:preset`` argument;
every value overridable with ``--config.section.key=value``; an unknown key fails with the list
of valid keys) and ``--workdir`` (overrides ``config.workdir``).

Structure: :func:`main` parses flags, initialises multi-host JAX (:func:`maybe_initialize_
distributed`), then calls :func:`run_training`, which returns a dict of final metrics and paths.
Further stages (e.g. BBQ evaluation before and after training) belong in :func:`main` around
that call; they can use ``result["export_dir"]`` (the merged HF model) or the returned state.

Multi-host: set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on every process (or ``--config.distributed.*``); on Cloud TPU pods
``jax.distributed.initialize()`` auto-detects everything (``distributed.initialize=auto``
detects the TPU environment).  On CPU the cross-process collectives are gloo (JAX's default).

Exit status: 0 on success and after a SIGTERM-triggered checkpoint (preemption); 1 with a
one-line error for bad configs/data/models and for a halt on repeated non-finite steps.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from regift_jax.core import configs_util
from regift_jax.experiment import run_experiment
from regift_jax.models.checkpoints import CheckpointError
from regift_jax.training import loop
from regift_jax.training.step import NonFiniteError

log = logging.getLogger("regift_jax.train")


def _tpu_multihost_env() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(dcfg) -> bool:
    """``jax.distributed.initialize`` when running on several processes; returns whether it ran.

    ``dcfg.initialize``: ``auto`` (when a coordinator address is given by config or
    ``JAX_COORDINATOR_ADDRESS``, or a multi-host TPU environment is detected), ``always`` or
    ``never``.  Must run before anything touches a JAX backend.
    """
    mode = str(dcfg.initialize)
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed.initialize={mode!r}; valid: auto, always, never")
    addr = dcfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = int(dcfg.num_processes) if int(dcfg.num_processes) > 0 else int(
        os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = int(dcfg.process_id) if int(dcfg.process_id) >= 0 else int(
        os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if mode == "never" or (mode == "auto" and not addr and not _tpu_multihost_env()):
        return False
    kw = {"initialization_timeout": int(dcfg.initialization_timeout)}
    if addr:
        kw["coordinator_address"] = addr
    if nproc > 0:
        kw["num_processes"] = nproc
    if pid >= 0:
        kw["process_id"] = pid
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def run_training(config, workdir: str = "", **kw) -> dict:
    """Train per ``config`` in ``workdir`` (default ``config.workdir``).

    Returns a dict with (among others) ``step``, ``total_steps``, ``train`` (last logged train
    metrics: loss, accuracy, learning_rate, grad_norm, tokens_per_s, step_time_s, mfu),
    ``eval`` (held-out loss/accuracy), ``preempted``, ``skipped_steps``, ``checkpoint_dir``,
    ``checkpoint_steps``, ``tensorboard_dir``, ``metrics_file``, ``export_dir`` (HF directory,
    LoRA merged; "" when export is off or the run was preempted), ``wall_time_s``, ``history``
    (every logged record) and the final ``state`` / ``frozen`` params / ``model_cfg``.
    Keyword arguments go to :func:`regift_jax.training.loop.run` (``callbacks``).
    """
    return loop.run(config, workdir or config.workdir, **kw)


def _summary_line(res: dict) -> str:
    tr, ev = res.get("train", {}), res.get("eval", {})
    parts = [f"step {res['step']}/{res['total_steps']}"]
    if "loss" in tr:
        parts.append(f"train loss {tr['loss']:.4f}")
    if "loss" in ev:
        parts.append(f"eval loss {ev['loss']:.4f}")
    parts.append(f"wall time {res['wall_time_s']:.1f} s")
    if res.get("preempted"):
        parts.append("PREEMPTED (checkpoint saved)")
    if res.get("export_dir"):
        parts.append(f"export {res['export_dir']}")
    return "training done: " + ", ".join(parts)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    try:
        configs_util.check_overrides(argv[1:])
    except (configs_util.ConfigKeyError, ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/*.py[:preset]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Work directory (overrides config.workdir).")
    flags.mark_flags_as_required(["config"])
    result = {}

    def _main(_):
        absl_logging.set_verbosity(absl_logging.INFO)  # our INFO lines go through absl's handler
        for noisy in ("absl", "orbax", "jax._src"):  # orbax logs its internals at INFO via absl
            logging.getLogger(noisy).setLevel(logging.WARNING)
        config = config_flag.value
        workdir = flags.FLAGS.workdir or config.workdir
        if not workdir:
            print("error: no work directory: pass --workdir=DIR or --config.workdir=DIR",
                  file=sys.stderr)
            sys.exit(2)
        configs_util.apply_xla_cpu_flags(config.xla_cpu_flags)  # before JAX starts
        maybe_initialize_distributed(config.distributed)
        try:
            if config.experiment.enabled:
                res = run_experiment(config, workdir, run_training)["train_result"]
            else:
                res = run_training(config, workdir)
        except (NonFiniteError, CheckpointError, FileNotFoundError, ValueError,
                RuntimeError) as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        print(_summary_line(res), flush=True)
        result.update(res)

    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
