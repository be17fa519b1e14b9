"""Command line: fine-tune a student on ReGiFT traces (or the Instruction baseline).

    python -m regift_jax.train --config=configs/llama.py --config.workdir=/tmp/run
    python -m regift_jax.train --config=configs/llama.py:llama3_1_8b --workdir=gs://... \\
        --config.optim.learning_rate=1e-4 --config.train.num_epochs=3
    python -m regift_jax.train --config=configs/instruction.py:smollm2_135m --workdir=/tmp/inst

Flags: ``--config`` (an ``ml_collections`` config file with an optional ``:preset`` argument;
every value overridable with ``--config.section.key=value``; an unknown key fails with the list
of valid keys) and ``--workdir`` (overrides ``config.workdir``).

Structure: :func:`main` parses flags, initialises multi-host JAX
(:func:`regift_jax.core.distributed.maybe_initialize_distributed`), then calls
:func:`run_training`, which returns a dict of final metrics and paths, or
:func:`regift_jax.experiment.run_experiment` around it when ``config.experiment.enabled``.  A
work directory that already holds the finished run (and, with the experiment on, its
``experiment.json``) is reported as such and left alone.

Multi-host: set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on every process (or ``--config.distributed.*``); on Cloud TPU pods
``jax.distributed.initialize()`` auto-detects everything (``distributed.initialize=auto``
detects the TPU environment).  On CPU the cross-process collectives are gloo (JAX's default).

Exit status: 0 on success, after a SIGTERM-triggered checkpoint (preemption) and for a finished
run; 2 with a one-line error for a bad config file, preset or key; 1 with a one-line error for
bad configs/data/models, an unwritable work directory, a resume of another model or other data,
and a halt on repeated non-finite steps.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from regift_jax.core import configs_util
from regift_jax.core.distributed import maybe_initialize_distributed
from regift_jax.experiment import run_experiment
from regift_jax.models.checkpoints import CheckpointError
from regift_jax.training import loop
from regift_jax.training.step import NonFiniteError

log = logging.getLogger("regift_jax.train")

EXPERIMENT_FILE = "experiment.json"  # regift_jax.experiment's record of a finished experiment


def run_training(config, workdir: str = "", **kw) -> dict:
    """Train per ``config`` in ``workdir`` (default ``config.workdir``).

    Returns a dict with (among others) ``step``, ``total_steps``, ``train`` (last logged train
    metrics: loss, accuracy, learning_rate, grad_norm, tokens_per_s, step_time_s, mfu),
    ``eval`` (held-out loss/accuracy), ``preempted``, ``skipped_steps``, ``checkpoint_dir``,
    ``checkpoint_steps``, ``tensorboard_dir``, ``metrics_file``, ``export_dir`` (HF directory,
    LoRA merged; "" when export is off or the run was preempted), ``wall_time_s``, ``history``
    (every logged record), ``identity`` / ``settings`` (:mod:`regift_jax.training.identity`)
    and the final ``state`` / ``frozen`` params / ``model_cfg`` / ``run`` / ``lora``.  A work
    directory that holds this finished run already gives its stored ``result.json`` with
    ``already_finished=True`` (no state, nothing trained).
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
    if res.get("already_finished"):
        parts.append("already finished before this start")
    if res.get("preempted"):
        parts.append("PREEMPTED (checkpoint saved)")
    if res.get("export_dir"):
        parts.append(f"export {res['export_dir']}")
    return "training done: " + ", ".join(parts)


def finished(config, workdir: str):
    """The stored result of a finished run in ``workdir`` (with the experiment on: only when its
    ``experiment.json`` is there too), or None."""
    done = loop.finished_run(config, workdir)
    if done is None:
        return None
    if config.experiment.enabled:
        path = os.path.join(workdir, EXPERIMENT_FILE)
        if not os.path.isfile(path):
            return None
        print(f"[experiment] already done: {path}", flush=True)
    return done


def _run(config, workdir: str) -> dict:
    workdir = loop.preflight(config, workdir)  # one-line errors before any model work
    done = finished(config, workdir)
    if done is not None:
        print(f"already finished: {os.path.abspath(workdir)} holds the finished run (step "
              f"{done['step']}/{done['total_steps']}); nothing to do", flush=True)
        return done
    if config.experiment.enabled:
        return run_experiment(config, workdir, run_training)["train_result"]
    return run_training(config, workdir)


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
        try:
            maybe_initialize_distributed(config.distributed)
            res = _run(config, workdir)
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
