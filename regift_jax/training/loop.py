"""The training run: :func:`run` loads the examples and the model, builds the inputs, the
optimizer and the train state (fresh or restored), runs the loop and exports the model.

Everything is driven by one ``ml_collections.ConfigDict``
(:func:`regift_jax.core.configs_util.base_config` lists and documents every knob);
``python -m regift_jax.train`` is its command line.

The mesh comes from ``config.mesh`` (axes ``data``, ``fsdp``, ``tensor``; ``-1`` fills) through
:func:`regift_jax.core.sharding.make_mesh`; batches are split over the ``batch`` rule's axes
(``data`` x ``fsdp``).  The loop reads each step's non-finite streak one step late, so the device
queue never drains (:func:`regift_jax.training.step.check_nonfinite`).  The held-out loss is
computed every ``eval.every_steps`` and at the end on a deterministic fraction of the training
source (``data.eval_fraction``, by question id; :mod:`regift_jax.training.examples`).

Before any model work :func:`run` checks the config (optimiser values included), that the work
directory is writable, and what the run is (:mod:`regift_jax.training.identity`): resuming
checkpoints of another model or other data is refused, and a finished run (``result.json``,
:func:`finished_run`) is not trained again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from regift_jax.core import memory as core_memory
from regift_jax.core import sharding as shd
from regift_jax.core.configs_util import merge_rules
from regift_jax.core.io import atomic_write_json
from regift_jax.data.pipeline import make_global_array
from regift_jax.models import decoder
from regift_jax.models.checkpoints import CheckpointError
from regift_jax.training import examples, identity, inputs, memory
from regift_jax.training import metrics as metrics_lib
from regift_jax.training import optim
from regift_jax.training import state as state_lib
from regift_jax.training.checkpointing import Checkpointer, Preemption, step_signature, \
    steps_on_disk
from regift_jax.training.step import check_nonfinite, jit_eval_step, jit_train_step

log = logging.getLogger(__name__)


class WorkdirError(ValueError):
    """The work directory cannot be created or written."""


def _validate(config):
    t = config.train
    k = inputs.accum_steps(t)
    if int(t.global_batch) <= 0 or k <= 0:
        raise ValueError("train.global_batch and train.grad_accum_steps must be > 0")
    if int(t.global_batch) % k:
        raise ValueError(f"train.global_batch={t.global_batch} is not divisible by "
                         f"train.grad_accum_steps={k}")
    if int(t.num_steps) <= 0 and float(t.num_epochs) <= 0:
        raise ValueError("set train.num_steps > 0 or train.num_epochs > 0")
    if not 0 <= float(config.data.eval_fraction) < 1:
        raise ValueError(f"data.eval_fraction={config.data.eval_fraction} not in [0, 1)")
    inputs.check_batch_unit(config.data)
    optim.validate(config.optim, int(t.num_steps) if int(t.num_steps) > 0 else None)


def _check_workdir(workdir: str, config) -> None:
    """Create ``workdir`` and write a probe file into it (a read-only location fails here, in
    one line, before any model work); refuse a used one when ``checkpoint.resume`` is off."""
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"work directory {workdir} is not writable: "
                           f"{e.strerror or type(e).__name__}") from None
    steps = steps_on_disk(workdir)
    if steps and not config.checkpoint.resume:
        raise ValueError(f"{os.path.join(workdir, 'checkpoints')} already holds checkpoints "
                         f"{steps} and checkpoint.resume is False: use a new workdir (or resume)")


def _start(config, workdir: Optional[str]) -> str:
    """Check the config, create the work directory and record the config in it."""
    workdir = workdir or config.workdir
    if not workdir:
        raise ValueError("no workdir: pass --workdir or --config.workdir")
    workdir = os.path.abspath(workdir)
    _validate(config)
    _check_workdir(workdir, config)
    if config.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(config.train.compilation_cache_dir))
    return workdir


def _identity(config) -> Optional[dict]:
    """The run's identity; None while the model is still to be downloaded (``model.download``:
    it is then taken once the model is loaded)."""
    try:
        return identity.identity(config)
    except (CheckpointError, FileNotFoundError):
        if not config.model.download:
            raise
        return None


def _record(config, workdir: str, ident: dict) -> dict:
    """Check ``ident`` against the work directory's checkpoints and record it and the config."""
    record = identity.check_and_record(config, workdir, ident)
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return record


# ============================================================================ set-up
@dataclasses.dataclass
class Model:
    """The model on its mesh, split into what trains and what stays frozen."""
    cfg: Any  # ModelConfig: the architecture
    run: Any  # RunConfig: dtypes, remat, attention kernel and chunks
    lora: Any  # LoraConfig (rank 0: full fine-tuning)
    tokenizer: Any
    mesh: Any
    rules: Any
    trainable: Any
    frozen: Any
    trainable_sh: Any
    frozen_sh: Any
    n_trainable: int
    n_frozen: int


def load_model(config) -> Model:
    mesh = shd.make_mesh({"data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp),
                          "tensor": int(config.mesh.tensor)})
    rules = merge_rules(shd.DEFAULT_RULES, config.mesh.rules)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())
    h = state_lib.load_model(config.model, config.lora, int(config.seed), mesh, rules)
    trainable, frozen, trainable_sh, frozen_sh = state_lib.split_trainable(
        h.cfg, h.lora, h.params, mesh, rules, run=h.run)
    h.params = None
    m = Model(h.cfg, h.run, h.lora, h.tokenizer, mesh, rules, trainable, frozen, trainable_sh,
              frozen_sh, state_lib.num_params(trainable), state_lib.num_params(frozen))
    log.info("params: %d trainable, %d frozen", m.n_trainable, m.n_frozen)
    return m


@dataclasses.dataclass
class Inputs:
    """The streamed training batches, the cached held-out batches and the step count."""
    template_id: str
    batch_sh: Any
    data_axes: Any
    total_steps: int
    steps_per_epoch: Optional[int]
    train_pipe: Any
    eval_batches: List[dict]


def make_inputs(config, model: Model, train_ex, eval_ex) -> Inputs:
    render, template_id = inputs.make_render(config.data, model.tokenizer)
    gb = int(config.train.global_batch)
    k = inputs.accum_steps(config.train)
    batch_sh = shd.batch_sharding(model.mesh, model.rules)
    n_batch_shards = shd.batch_shards(model.mesh, model.rules)
    if gb % (k * n_batch_shards):
        raise ValueError(f"train.global_batch={gb} must be divisible by grad_accum_steps ({k}) x "
                         f"batch shards ({n_batch_shards}: mesh axes {batch_sh.spec[0]})")
    total, per_epoch = inputs.total_steps(config, train_ex, model.tokenizer, render)
    train_pipe = inputs.make_pipeline(train_ex, model.tokenizer, render, config.data,
                                      global_batch=gb, seed=int(config.seed), num_epochs=None,
                                      shuffle=bool(config.data.shuffle),
                                      prefetch=int(config.data.prefetch))
    return Inputs(template_id, batch_sh, batch_sh.spec[0], total, per_epoch, train_pipe,
                  inputs.eval_batches(eval_ex, model.tokenizer, render, config))


# ============================================================================ the loop
class Trainer:
    """The optimizer, the train state (fresh or restored), the compiled steps and the loop."""

    def __init__(self, config, workdir: str, model: Model, inp: Inputs, record: dict):
        self.config, self.workdir, self.model, self.inp = config, workdir, model, inp
        self.record = record  # identity and settings (regift_jax.training.identity)
        self.total_steps = inp.total_steps
        self.already_finished = False
        tx, schedule = optim.make_optimizer(config.optim, inp.total_steps, model.trainable)
        repl = NamedSharding(model.mesh, P())
        state_sh, opt_abstract = state_lib.state_shardings(tx, model.trainable,
                                                           model.trainable_sh, model.mesh)
        self.ckpt = Checkpointer(workdir, config.checkpoint,
                                 finite_fn=jax.jit(state_lib.all_finite, out_shardings=repl))
        self.start_step, self.state = self._restore(
            state_lib.abstract_state(model.trainable, opt_abstract, state_sh))
        if self.state is None:
            self.state = state_lib.init_state(tx, model.trainable, state_sh, int(config.seed))
        model.trainable = None  # now owned (and donated) by the state
        self.step_fn = jit_train_step(model.cfg, tx, schedule, state_sh, model.frozen_sh,
                                      inp.batch_sh, accum=inputs.accum_steps(config.train),
                                      run=model.run, lora=model.lora)
        self.eval_fn = jit_eval_step(model.cfg, model.trainable_sh, model.frozen_sh,
                                     inp.batch_sh, repl, run=model.run, lora=model.lora)
        self._metrics_setup()
        self.saved_steps: List[int] = []
        self.last_metrics: Dict[str, float] = {}
        self.last_eval: Dict[str, float] = {}
        self.preempted = False

    def _checked_step(self, batch):
        """On a device that reports its memory: the step compiled ahead of time (the compile its
        first call would do) and checked to fit (:mod:`regift_jax.training.memory`); elsewhere,
        or with ``train.memory_check`` off, the jitted step."""
        limit = core_memory.device_limit(jax.local_devices()[0])
        if limit is None or not self.config.train.memory_check:
            return self.step_fn
        exe = self.step_fn.lower(self.state, self.model.frozen, batch).compile()
        k = inputs.accum_steps(self.config.train)
        params = jax.tree.leaves(self.state.params)
        log.info(memory.check(
            core_memory.memory(exe), limit, rows=int(self.config.train.global_batch) // k,
            global_batch=int(self.config.train.global_batch),
            batch_shards=shd.axes_size(self.model.mesh, self.inp.data_axes),
            accum_bytes=0 if k > 1 else sum(4 * x.addressable_shards[0].data.size
                                            for x in params),
            remat_policy=self.model.run.remat_policy))
        return exe

    def _restore(self, abstract):
        """(start step, restored state or None)."""
        if not self.config.checkpoint.resume:  # _check_workdir refused a used workdir
            return 0, None
        restored = self.ckpt.restore(abstract)
        if restored is None:
            return 0, None
        step, state, data_json = restored
        diffs = identity.differences(data_json.get("settings"), self.record["settings"])
        if data_json.get("settings") is not None and diffs:
            log.warning("resuming from step %d with settings that differ from the checkpoint's "
                        "(checkpoint -> now): %s", step, identity.describe(diffs))
        self.inp.train_pipe.set_state(data_json["data"])
        log.info("resumed from step %d (%s)", step, self.ckpt.dir)
        return step, state

    def _metrics_setup(self):
        cfg, model = self.config, self.model
        self.seq_len = int(cfg.data.seq_len)
        self.flops_tok = metrics_lib.train_flops_per_token(
            model.cfg, self.seq_len, model.n_trainable if cfg.lora.enabled else 0)
        peak, self.total_peak, source = metrics_lib.total_peak_flops(
            float(cfg.log.peak_flops_per_device))
        self.logger = metrics_lib.MetricsLogger(self.workdir, cfg.log, self.total_steps,
                                                self.start_step)
        if jax.process_index() == 0:
            on_cpu = jax.local_devices()[0].platform == "cpu"
            log.info("MFU peak: %.3e FLOP/s per %s (%s); %.3e train FLOPs per token slot",
                     peak, "process" if on_cpu else "device", source, self.flops_tok)

    def _batch(self, local):
        return make_global_array(local, self.model.mesh, self.inp.data_axes)

    def save(self, step: int):
        ok = self.ckpt.save(step, self.state, self.inp.train_pipe.get_state(),
                            {"step": step, "template": self.inp.template_id,
                             "settings": self.record["settings"]})
        if ok:
            self.saved_steps.append(step)

    def evaluate(self, step: int) -> Dict[str, float]:
        if not self.inp.eval_batches:
            return {}
        sums = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
        outs = [self.eval_fn(self.state.params, self.model.frozen, self._batch(b))
                for b in self.inp.eval_batches]
        for o in jax.device_get(outs):
            for k in sums:
                sums[k] += float(o[k])
        n = max(sums["tokens"], 1.0)
        vals = {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n,
                "tokens": sums["tokens"]}
        self.logger.write(step, "eval", vals)
        return vals

    def _log_train(self, step: int, pending: list, t_log: float) -> float:
        """Write the summary of the ``pending`` steps' metrics; returns the new interval start."""
        host = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        slots = len(pending) * int(self.config.train.global_batch) * self.seq_len
        self.last_metrics = metrics_lib.summarise(host, now - t_log, slots, self.flops_tok,
                                                  self.total_peak)
        self.logger.write(step, "train", self.last_metrics)
        self.logger.advance(len(pending), loss=self.last_metrics["loss"])
        return now

    def _check(self, step: int, metrics) -> None:
        check_nonfinite(step, metrics, int(self.config.train.max_nonfinite_in_a_row),
                        self.saved_steps[-1:] or "none")

    def _periodic(self, step: int) -> None:
        """The evaluation and checkpoint due after ``step`` (the final ones come later)."""
        every_eval = int(self.config.eval.every_steps)
        if every_eval > 0 and step % every_eval == 0 and step < self.total_steps:
            self.last_eval = self.evaluate(step)
        every = int(self.config.checkpoint.every_steps)
        if every > 0 and step % every == 0 and step < self.total_steps:
            self.save(step)

    def _preempt(self, step: int) -> None:
        log.warning("SIGTERM received: saving a checkpoint at step %d and exiting", step)
        self.save(step)
        self.ckpt.wait()
        self.preempted = True

    def train(self, preempt: Preemption, callbacks: Sequence[Callable], t_start: float) -> int:
        """Run the steps from the start step to the end (or a preemption); returns the step."""
        cfg, step = self.config, self.start_step
        if step >= self.total_steps:
            log.info("training already finished: step %d of %d in %s; nothing to do", step,
                     self.total_steps, self.workdir)
            self.already_finished = True
            return step
        if cfg.eval.at_start and step == 0:
            self.last_eval = self.evaluate(0)
        log.info("setup done in %.1f s (steps %d -> %d)", time.time() - t_start, step,
                 self.total_steps)
        info = {"config": cfg, "workdir": self.workdir, "mesh": self.model.mesh,
                "model_cfg": self.model.cfg, "run": self.model.run, "lora": self.model.lora,
                "checkpointer": self.ckpt,
                "pipeline": self.inp.train_pipe, "total_steps": self.total_steps}
        pending, prev, t_log = [], None, time.perf_counter()
        log_every = max(int(cfg.log.every_steps), 1)
        while step < self.total_steps:
            batch = self._batch(next(self.inp.train_pipe))
            if step == self.start_step:
                self.step_fn = self._checked_step(batch)
            self.state, metrics = self.step_fn(self.state, self.model.frozen, batch)
            step += 1
            if step == self.start_step + 1:
                jax.block_until_ready(metrics)
                log.info("first step (with compilation) done at %.1f s", time.time() - t_start)
            pending.append((step, metrics))
            if prev is not None:  # one step late: the device queue keeps one step in flight
                self._check(*prev)
            prev = (step, metrics)
            if step % log_every == 0 or step == self.total_steps:
                t_log, pending = self._log_train(step, pending, t_log), []
            self._periodic(step)
            for cb in callbacks:
                cb(step, {**info, "state": self.state})
            if preempt.requested():
                self._preempt(step)
                break
        if prev is not None:
            self._check(*prev)
        if not self.preempted:
            if pending:
                self._log_train(step, pending, t_log)
            self.last_eval = self.evaluate(step) or self.last_eval
            self.save(step)
        return step


# ============================================================================ the run
def _log_data_stats(pstats: dict) -> None:
    tok = pstats["tokenize"]
    log.info("data: %d examples read, %d kept (%d with truncated reasoning), dropped %s; packing "
             "efficiency %.3f", tok["seen"], tok["kept"], tok["truncated"],
             tok["dropped"] or "none", pstats["packing_efficiency"])
    if tok["dropped"]:
        log.warning("%d of %d training examples read were dropped by tokenization: %s "
                    "(see data.seq_len / data.overlong)", sum(tok["dropped"].values()),
                    tok["seen"], tok["dropped"])


def _export(config, workdir: str, t: Trainer) -> str:
    if t.preempted or not config.export.enabled:
        return ""
    path = config.export.path or os.path.join(workdir, "export")
    if t.already_finished and os.path.isfile(os.path.join(path, "config.json")):
        return path
    return state_lib.export_model(t.model.cfg, t.model.lora, t.state.params, t.model.frozen,
                                  t.model.tokenizer, path, str(config.export.dtype))


def _result(config, workdir: str, t: Trainer, extra: dict) -> dict:
    pstats = t.inp.train_pipe.stats.to_dict()
    _log_data_stats(pstats)
    step = int(jax.device_get(t.state.step))
    final = ({"step": step, "files": step_signature(workdir, step)}
             if step in t.ckpt.steps() and not t.preempted else {})
    result = {
        "step": step, "total_steps": t.total_steps, "already_finished": t.already_finished,
        "identity": t.record["identity"], "settings": t.record["settings"],
        "final_checkpoint": final,
        "steps_per_epoch": t.inp.steps_per_epoch, "preempted": t.preempted,
        "skipped_steps": int(jax.device_get(t.state.skipped)), "train": t.last_metrics,
        "eval": t.last_eval, "workdir": workdir, "checkpoint_dir": t.ckpt.dir,
        "checkpoint_steps": sorted(set(t.saved_steps)),
        "tensorboard_dir": os.path.join(workdir, "tensorboard") if config.log.tensorboard else "",
        "metrics_file": os.path.join(workdir, "metrics.jsonl"), **extra,
        "template": t.inp.template_id, "pipeline_stats": pstats,
        "trainable_params": t.model.n_trainable, "frozen_params": t.model.n_frozen,
        "history": t.logger.history,
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, identity.RESULT_FILE),
                          {k: v for k, v in result.items() if k != "history"})
    result.update(state=t.state, frozen=t.model.frozen, model_cfg=t.model.cfg, run=t.model.run,
                  lora=t.model.lora)
    return result


def run(config, workdir: Optional[str] = None, *, callbacks: Sequence[Callable] = ()) -> dict:
    """Train according to ``config``; returns final metrics and paths (see
    :func:`regift_jax.train.run_training`).

    ``callbacks``: callables ``cb(step, trainer_info)`` run on every process after each step
    (``trainer_info`` is a dict with ``state``, ``checkpointer`` ...); for tests and extra stages.
    """
    t_start = time.time()
    workdir = _start(config, workdir)
    ident = _identity(config)
    done = identity.finished(config, workdir, ident) if ident else None
    if done is not None:
        log.info("training already finished: step %d of %d in %s (result.json); nothing to do",
                 done["step"], done["total_steps"], workdir)
        return done
    record = _record(config, workdir, ident) if ident else None
    train_ex, eval_ex, data_summary = examples.train_and_eval_examples(config.data)  # fail fast
    model = load_model(config)
    if record is None:  # the model was downloaded just now
        record = _record(config, workdir, identity.identity(config))
    t = Trainer(config, workdir, model, make_inputs(config, model, train_ex, eval_ex), record)
    preempt = Preemption()
    preempt.install()
    try:
        with decoder.trace_context(model.mesh, model.run, model.rules):
            t.train(preempt, callbacks, t_start)
        t.ckpt.wait()
    finally:
        preempt.uninstall()
        t.logger.close()
        t.inp.train_pipe.close()
        t.ckpt.wait()  # never leave a save half-written behind an exception
    export_dir = _export(config, workdir, t)
    t.ckpt.close()
    return _result(config, workdir, t, {
        "export_dir": export_dir, "data": data_summary, "num_train_examples": len(train_ex),
        "num_eval_examples": len(eval_ex), "wall_time_s": time.time() - t_start})


def preflight(config, workdir: Optional[str] = None) -> str:
    """The checks :func:`run` makes before any model work (config and optimiser values, a
    writable work directory, no resume of another model or other data), for callers that do
    model work before calling it (the experiment evaluates the base model first); returns the
    absolute work directory."""
    workdir = _start(config, workdir)
    ident = _identity(config)
    if ident:
        identity.check(config, workdir, ident)
    return workdir


def finished_run(config, workdir: Optional[str] = None) -> Optional[dict]:
    """The stored result (``result.json``, with ``already_finished=True``) when ``workdir``
    holds a finished run of ``config`` (same model, data and settings, final checkpoint intact;
    :func:`regift_jax.training.identity.finished`), else None.  For callers that would do work
    around training (the experiment's evaluations) before calling :func:`run`, which returns the
    same dict without training again."""
    workdir = os.path.abspath(workdir or config.workdir)
    if not os.path.isfile(os.path.join(workdir, identity.RESULT_FILE)):
        return None
    ident = _identity(config)
    return identity.finished(config, workdir, ident) if ident else None
