"""The trainer: train state, a pure jitted ``train_step``, the loop, checkpoints, metrics, export.

Everything is driven by one ``ml_collections.ConfigDict`` (:func:`regift_jax.core.configs_util.
base_config` lists and documents every knob); :func:`run` is the whole training run and
``python -m regift_jax.train`` its command line.

State and sharding
------------------
:class:`TrainState` holds only what training changes: ``step`` (batches consumed), the
*trainable* ``params``, the optax ``opt_state``, the base ``rng`` key and non-finite-step
counters.  With LoRA the trainable params are the adapter leaves only
(:func:`regift_jax.models.lora.split`); the frozen base weights are a separate argument of the
step, never differentiated, never in the optimizer state and never checkpointed (on resume they
are reloaded from the model source, which must therefore not change between runs).  With full
fine-tuning every weight is trainable and the frozen tree is empty.

The mesh comes from ``config.mesh`` (axes ``data``, ``fsdp``, ``tensor``; ``-1`` fills) through
:func:`regift_jax.core.sharding.make_mesh`; parameter shardings from the one logical-axis rules table
(:data:`regift_jax.core.sharding.DEFAULT_RULES`, entries overridable by ``config.mesh.rules``); the
optimizer state is sharded like the parameters it mirrors (``optax.tree_map_params``); batches
are split over the ``batch`` rule's axes (``data`` x ``fsdp``).  ``train_step`` is compiled once
with ``jax.jit`` with explicit in/out shardings and the state donated.

The step
--------
``train_step(state, frozen, batch)`` is pure.  The global batch ``[B, T]`` is split into
``k = train.grad_accum_steps`` micro-batches (row ``i*k + j`` goes to micro-batch ``j`` so every
device keeps its rows); a ``lax.scan`` sums the *summed* token losses and their gradients, and
the total is divided by the number of loss tokens of the whole global batch.  The loss is
therefore the per-token mean over the global batch whatever ``k`` is, and ``k`` micro-batches of
``b`` rows give the gradient of one batch of ``k*b`` rows (tested to 1e-5).  (LoRA dropout draws
a different mask per micro-batch, so with dropout the two agree in distribution only.)

Loss: next-token cross-entropy on the pipeline's ``targets`` where ``loss_mask == 1`` (the
response tokens and EOS; prompt and padding never contribute), averaged over those tokens; token
accuracy is argmax == target on the same tokens.  With ``model.loss_chunk > 0`` (default) the LM
head runs only on the loss positions, chunk by chunk, with its gradient computed in the same pass
(:mod:`regift_jax.models.head_loss`); ``model.attention_chunk`` skips the causally masked half of
the attention scores.  Both give the same loss and gradients as the plain path (tested);
``model.attention_impl`` ("xla"/"cudnn") routes the attention through
``jax.nn.dot_product_attention`` instead (``attention_chunk`` then does not apply).

Non-finite loss or gradients: the update is computed and then discarded inside the jitted step
(``jnp.where`` over params and optimizer state), so the state is unchanged; ``skipped`` counts
such steps and ``bad_streak`` the current run of them.  The host halts with
:class:`NonFiniteError` once ``bad_streak`` reaches ``train.max_nonfinite_in_a_row`` (read one
step late so the device queue never drains).  A checkpoint is only written from a state whose
trainable params are all finite.

Optimizer: optax AdamW (decoupled weight decay scaled by the learning rate, as PyTorch's AdamW)
after global-norm clipping; warmup (linear from 0) then linear / cosine decay or constant.
Weight decay is masked off for parameters whose path matches ``optim.no_decay`` (default: RMSNorm
scales, biases and the token embedding: decaying a norm scale or a bias towards 0 changes the
function rather than regularising it, and embedding rows of rare tokens would be shrunk at every
step they are not seen).  The reported ``grad_norm`` is the norm before clipping.

Checkpoints
-----------
orbax ``CheckpointManager`` in ``<workdir>/checkpoints``: every ``checkpoint.every_steps``, at
the end and on SIGTERM; ``keep`` most recent; async (the device-to-host copy happens before
``save`` returns, so donating the state afterwards is safe); atomic (orbax writes a temporary
directory and renames it on commit, so a killed save leaves no step behind).  The data
iterator's JSON state of every process is written, atomically, *before* the orbax save to
``<workdir>/data_state/<step>/process_<i>.json``.  Resume restores the newest step whose state
and data files read back (and whose params are finite); an unreadable one is moved to
``<workdir>/checkpoints_unreadable/`` with a warning and the previous one is used.

SIGTERM (preemption): the handler only sets a flag; the loop saves at the current step, waits for
the write to finish and returns normally (the command exits 0).  With several processes the flag
is OR-reduced across processes each step so all stop at the same step.

Metrics
-------
Every ``log.every_steps`` steps: loss and token accuracy (token-weighted over the interval),
learning rate, grad norm (interval mean), tokens/s (non-padding tokens), step time and MFU, to
stdout (tqdm progress bar), TensorBoard (``<workdir>/tensorboard``, tensorboardX) and
``<workdir>/metrics.jsonl``.  The held-out loss is computed every ``eval.every_steps`` and at the
end on a deterministic fraction of the training source (``data.eval_fraction``, by question id).

MFU = achieved model FLOP/s / peak FLOP/s.  Model FLOPs per step = ``B * T *
flops_per_token(T)`` (:meth:`ModelConfig.flops_per_token`: ``6 N + 12 L H hd T``, every row slot
counted, padding included, since it is computed).  With LoRA the weight gradients of the frozen
matrices are not computed, so ``2 N_frozen`` per token is subtracted and ``6 N_lora`` added.
Peak: ``log.peak_flops_per_device`` if > 0, else a table of dense bf16 peaks of known
accelerators (:data:`PEAK_FLOPS`), else (CPU) a float32 matmul measured once at start-up; on CPU
that figure is the whole host's, so the total peak is per-process rather than per-device.

Export
------
At the end the trainable params are combined with the base, LoRA is merged
(:func:`regift_jax.models.lora.merge_lora`) and the model is written as a Hugging Face directory
(:func:`regift_jax.models.checkpoints.export_hf`) at ``export.path`` (default ``<workdir>/export``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from regift_jax.core import sharding as shd
from regift_jax.models import lora as lora_lib
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import Decoder, head_weight, param_shardings
from regift_jax.models.head_loss import head_loss

log = logging.getLogger("regift_jax.training.trainer")

CHECKPOINT_DIR = "checkpoints"
DATA_STATE_DIR = "data_state"
UNREADABLE_DIR = "checkpoints_unreadable"

# Dense bf16 peak FLOP/s per device (vendor figures); matched as substrings of device_kind.
PEAK_FLOPS = (
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10", 125e12),
)


class NonFiniteError(RuntimeError):
    """Training halted after too many consecutive non-finite steps."""


# ============================================================================ state
@struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed (skipped steps included)
    params: Any  # trainable params (LoRA leaves, or everything for full fine-tuning)
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)
    applied: jax.Array  # int32: optimizer updates applied (= the schedule's step)
    skipped: jax.Array  # int32: non-finite steps skipped in total
    bad_streak: jax.Array  # int32: current run of consecutive skipped steps


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, no_decay: Sequence[str]):
    """True where weight decay applies: the path matches none of the ``no_decay`` regexes."""
    pats = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(_path_str(path)) for p in pats), params)


def make_schedule(ocfg, total_steps: int):
    """Warmup (linear from 0) then ``linear`` / ``cosine`` decay to ``end_lr_fraction`` or
    ``constant``; ``total_steps`` counts optimizer updates."""
    lr = float(ocfg.learning_rate)
    total = max(int(total_steps), 1)
    warm = int(ocfg.warmup_steps) if int(ocfg.warmup_steps) >= 0 else int(
        round(float(ocfg.warmup_fraction) * total))
    warm = min(max(warm, 0), total)
    end = lr * float(ocfg.end_lr_fraction)
    decay_steps = max(total - warm, 1)
    if ocfg.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif ocfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif ocfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={ocfg.schedule!r}; valid: linear, cosine, constant")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(ocfg, total_steps: int, params):
    """(optax transformation, schedule): clip_by_global_norm -> AdamW with a decay mask."""
    schedule = make_schedule(ocfg, total_steps)
    parts = []
    if float(ocfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                             weight_decay=float(ocfg.weight_decay),
                             mask=decay_mask(params, tuple(ocfg.no_decay))))
    return optax.chain(*parts), schedule


# ============================================================================ loss and step
def token_loss(logits, targets, loss_mask):
    """(sum of masked token NLL, number of loss tokens, number of correct argmax predictions)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = loss_mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(correct * m)


def _forward(model_cfg, params, batch, rng, deterministic, return_hidden=False):
    """The decoder on ``batch["inputs"]``; a batch without ``positions``/``segment_ids`` is one
    unpadded sequence per row (plain causal attention; the data pipeline always gives both)."""
    rngs = None if deterministic else {"dropout": rng}
    return Decoder(model_cfg).apply({"params": params}, batch["inputs"],
                                    positions=batch.get("positions"),
                                    segment_ids=batch.get("segment_ids"),
                                    deterministic=deterministic, rngs=rngs,
                                    return_hidden=return_hidden)


def batch_loss(model_cfg, params, batch, rng, deterministic):
    """(summed masked NLL, loss tokens, correct argmax predictions) of one batch.  With
    ``model_cfg.loss_chunk > 0`` the LM head and the loss run on the loss positions only
    (:func:`regift_jax.models.head_loss.head_loss`); otherwise on full logits (:func:`token_loss`).
    """
    if model_cfg.loss_chunk <= 0:
        logits = _forward(model_cfg, params, batch, rng, deterministic)
        return token_loss(logits, batch["targets"], batch["loss_mask"])
    hidden = _forward(model_cfg, params, batch, rng, deterministic, return_hidden=True)
    w, vocab_major = head_weight(params, model_cfg)
    return head_loss(hidden, w, batch["targets"], batch["loss_mask"],
                     chunk=model_cfg.loss_chunk, vocab_major=vocab_major, dtype=model_cfg.dtype)


def _micro_batches(batch, k: int, batch_sharding=None):
    """[B, T] -> [k, B/k, T]; micro-batch j holds rows j, j+k, j+2k, ... (device-local)."""
    def one(x):
        B = x.shape[0]
        y = x.reshape((B // k, k) + x.shape[1:]).swapaxes(0, 1)
        if batch_sharding is not None:
            spec = P(None, *batch_sharding.spec)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(batch_sharding.mesh, spec))
        return y
    return jax.tree.map(one, batch)


def loss_and_grads(trainable, frozen, batch, rng, *, model_cfg: ModelConfig, accum: int = 1,
                   batch_sharding=None, param_shardings=None):
    """Per-token mean loss over the whole batch and its gradient w.r.t. ``trainable``.

    Returns ``(grads, {"loss", "tokens", "correct"})`` with ``grads`` = d(mean loss)/d(params);
    ``accum`` micro-batches are scanned (see the module docstring).  ``param_shardings`` (of
    ``trainable``) pins the gradient accumulator to the parameters' sharding (FSDP: never a
    replicated full-size gradient)."""
    def summed(p, b, key):
        s, n, c = batch_loss(model_cfg, lora_lib.combine(p, frozen), b, key, deterministic=False)
        return s, (n, c)

    def micro(p, b, key):
        (g, (n, c)), s = _value_and_grad(summed, p, b, key)
        return g, s, n, c

    if accum == 1:
        g, s, n, c = micro(trainable, batch, jax.random.fold_in(rng, 0))
    else:
        mb = _micro_batches(batch, accum, batch_sharding)

        def body(carry, xs):
            g_acc, s_acc, n_acc, c_acc = carry
            b, j = xs
            g, s, n, c = micro(trainable, b, jax.random.fold_in(rng, j))
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n, c_acc + c), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (g, s, n, c), _ = jax.lax.scan(body, init, (mb, jnp.arange(accum)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x, p: (x / denom).astype(p.dtype), g, trainable)
    return grads, {"loss": s / denom, "tokens": n, "correct": c}


def _value_and_grad(fn, p, b, key):
    (s, aux), g = jax.value_and_grad(fn, has_aux=True)(p, b, key)
    return (g, aux), s


def train_step(state: TrainState, frozen, batch, *, model_cfg: ModelConfig, tx, schedule,
               accum: int = 1, batch_sharding=None, param_shardings=None):
    """One optimizer step (pure).  Returns ``(new_state, metrics)``; see the module docstring."""
    rng = jax.random.fold_in(state.rng, state.step)
    grads, aux = loss_and_grads(state.params, frozen, batch, rng, model_cfg=model_cfg,
                                accum=accum, batch_sharding=batch_sharding,
                                param_shardings=param_shardings)
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    streak = jnp.where(finite, 0, state.bad_streak + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, new_params, state.params),
        opt_state=jax.tree.map(keep, new_opt, state.opt_state),
        applied=state.applied + finite.astype(jnp.int32),
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_streak=streak)
    metrics = {
        "loss": aux["loss"], "tokens": aux["tokens"], "correct": aux["correct"],
        "grad_norm": gnorm, "learning_rate": jnp.asarray(schedule(state.applied), jnp.float32),
        "finite": finite, "skipped": new_state.skipped, "bad_streak": streak,
        "nonpad": (jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
                   if "segment_ids" in batch else jnp.float32(batch["inputs"].size)),
    }
    return new_state, metrics


def split_trainable(model_cfg: ModelConfig, params, mesh, rules=shd.DEFAULT_RULES):
    """``(trainable, frozen, trainable_shardings, frozen_shardings)``: with LoRA
    (``model_cfg.lora_rank > 0``) the adapters train and the base weights are frozen (and never
    enter the optimizer state); without it every parameter trains and ``frozen`` is ``{}``."""
    full_sh = param_shardings(model_cfg, mesh, rules)
    if model_cfg.lora_rank > 0:
        return (*lora_lib.split(params), *lora_lib.split(full_sh))
    return params, {}, full_sh, {}


def state_shardings(tx, trainable, trainable_sh, mesh) -> Tuple[TrainState, Any]:
    """(a :class:`TrainState` of shardings, the abstract optimizer state): optimizer moments
    follow their parameters' sharding, scalars are replicated."""
    repl = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_sh,
                                   transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=trainable_sh, opt_state=opt_sh, rng=repl,
                      applied=repl, skipped=repl, bad_streak=repl), opt_abstract


def init_state(tx, trainable, state_sh: TrainState, seed: int) -> TrainState:
    """A fresh train state placed on ``state_sh`` (the optimizer state is built sharded)."""
    init_opt = jax.jit(tx.init, out_shardings=state_sh.opt_state)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: state is donated)
    state = TrainState(step=z(), params=trainable, opt_state=init_opt(trainable),
                       rng=jax.random.PRNGKey(int(seed)), applied=z(), skipped=z(),
                       bad_streak=z())
    return jax.device_put(state, state_sh)


def jit_train_step(model_cfg: ModelConfig, tx, schedule, state_sh: TrainState, frozen_sh,
                   batch_sh, accum: int = 1):
    """:func:`train_step` jitted with explicit in/out shardings and the state donated:
    ``step_fn(state, frozen, batch) -> (state, metrics)``."""
    return jax.jit(functools.partial(train_step, model_cfg=model_cfg, tx=tx, schedule=schedule,
                                     accum=accum, batch_sharding=batch_sh,
                                     param_shardings=state_sh.params),
                   in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, state_sh.step), donate_argnums=(0,))


def eval_step(params, frozen, batch, *, model_cfg: ModelConfig):
    """Summed masked NLL, loss tokens and correct predictions of one batch (deterministic)."""
    s, n, c = batch_loss(model_cfg, lora_lib.combine(params, frozen), batch, None, True)
    return {"loss_sum": s, "tokens": n, "correct": c}


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# ============================================================================ data
def _resolve_path(p: str) -> str:
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p
    from regift_jax.core.paths import REPO_ROOT
    alt = os.path.join(REPO_ROOT, p)
    return alt if os.path.exists(alt) else p


def load_examples(dcfg) -> Tuple[List[dict], dict]:
    """Training examples as dicts ``{id, context, question, reasoning, answer}`` and a summary.

    ``traces``: :func:`regift_jax.data.records.read_trace_jsonl` (bad lines dropped and
    counted, the report logged) then ``select_records(selection, criterion)``.
    ``squad_gold``: SQuAD-v2 questions of ``squad_split`` with their first gold answer
    (``Not in background.`` for unanswerable ones), split by article hash as the SquadV2 builder.
    """
    if dcfg.kind == "traces":
        from regift_jax.data import records as rec_lib
        src = _resolve_path(dcfg.source)
        if not src or not (os.path.exists(src) or any(c in src for c in "*?[")):
            raise FileNotFoundError(
                f"data.source={dcfg.source!r}: trace set not found (generate it with "
                "regift_jax.traces.generate, or point --config.data.source at a directory of "
                "*.jsonl shards, e.g. tests/fixtures/train/traces)")
        recs, report = rec_lib.read_trace_jsonl(src)
        report.log(log)
        sel = rec_lib.select_records(recs, dcfg.selection, dcfg.criterion)
        out = [{"id": r.id, "context": r.context, "question": r.question,
                "reasoning": r.reasoning, "answer": r.answer} for r in sel]
        summary = {"source": src, "lines": report.n_lines, "records": report.n_records,
                   "dropped": report.n_dropped, "selected": len(out),
                   "selection": dcfg.selection, "criterion": dcfg.criterion}
        return out, summary
    if dcfg.kind == "squad_gold":
        from regift_jax.core import prompts
        from regift_jax.core.paths import default_source_dir
        from regift_jax.data.builders.squad_v2 import _find_local, article_bucket, read_squad_v2
        src = _resolve_path(dcfg.source) if dcfg.source else default_source_dir("squad_v2")
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"data.source={dcfg.source!r}: no SQuAD-v2 directory "
                                    "(expected dev-v2.0.json or dev-v2.0.reconstructed.json)")
        rows = read_squad_v2(_find_local(src))
        nb, pb = int(dcfg.squad_num_buckets), int(dcfg.squad_pool_buckets)
        if dcfg.squad_split == "pool":
            rows = [r for r in rows if article_bucket(r["title"], nb) < pb]
        elif dcfg.squad_split == "heldout":
            rows = [r for r in rows if article_bucket(r["title"], nb) >= pb]
        elif dcfg.squad_split != "validation":
            raise ValueError(f"data.squad_split={dcfg.squad_split!r}; valid: pool, heldout, "
                             "validation")
        out = [{"id": r["id"], "context": r["context"], "question": r["question"],
                "reasoning": "",
                "answer": prompts.NOT_IN_BACKGROUND if r["is_impossible"]
                else r["answers"][0]["text"]} for r in rows]
        return out, {"source": src, "split": dcfg.squad_split, "selected": len(out)}
    raise ValueError(f"data.kind={dcfg.kind!r}; valid: traces, squad_gold")


def split_heldout(examples: List[dict], fraction: float, salt: str = ""
                  ) -> Tuple[List[dict], List[dict]]:
    """(train, heldout): an example is held out iff ``sha256(salt + id)`` / 2**256 <
    ``fraction``; deterministic, independent of order, and every sample of one question id lands
    on the same side."""
    if fraction <= 0:
        return list(examples), []
    train, held = [], []
    for e in examples:
        h = int(hashlib.sha256((salt + str(e["id"])).encode("utf-8")).hexdigest(), 16)
        (held if h < fraction * 2 ** 256 else train).append(e)
    return train, held


def make_render(dcfg, tokenizer):
    from regift_jax.core import prompts
    from regift_jax.data.pipeline import make_trace_render
    tmpl = prompts.get_template(dcfg.template)
    if tmpl.target_text is None:
        raise ValueError(f"data.template={dcfg.template!r} is an evaluation prompt (no target)")
    if tuple(tmpl.required_fields) != ("context", "question"):
        raise ValueError(f"data.template={dcfg.template!r} needs fields {tmpl.required_fields}; "
                         "training templates take context and question")

    def prompt_fn(r):
        p = tmpl.render_prompt(context=r["context"], question=r["question"])
        if dcfg.chat_template:
            p = prompts.wrap_chat(tokenizer, p)
        return p

    reasoning_key = "reasoning" if "reasoning" in tmpl.target_fields else None
    return make_trace_render(prompt_fn, response_template=tmpl.target_text,
                             reasoning_key=reasoning_key), tmpl.id


def make_pipeline(examples, tokenizer, render, dcfg, *, global_batch: int, seed: int,
                  num_epochs: Optional[int], shuffle: bool, prefetch: int,
                  drop_remainder: bool = False):
    from regift_jax.data.pipeline import SFTPipeline
    add_bos = {"": None, "true": True, "false": False}.get(str(dcfg.add_bos).lower())
    if add_bos is None and str(dcfg.add_bos) != "":
        raise ValueError(f"data.add_bos={dcfg.add_bos!r}; valid: '', 'true', 'false'")
    if add_bos is None and dcfg.chat_template:
        add_bos = False  # chat templates write their own BOS text
    kw = {}
    if str(dcfg.boundary) != "auto":
        kw["boundary"] = dcfg.boundary
    pad = getattr(tokenizer, "pad_token_id", None)
    return SFTPipeline(examples, tokenizer, render, seq_len=int(dcfg.seq_len),
                       global_batch=global_batch, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, packing=dcfg.packing,
                       max_open_rows=int(dcfg.max_open_rows),
                       epoch_boundary=dcfg.epoch_boundary, drop_remainder=drop_remainder,
                       overlong=dcfg.overlong, add_bos=add_bos, add_eos=bool(dcfg.add_eos),
                       pad_id=int(pad) if pad is not None else 0,
                       tokenize_chunk=int(dcfg.tokenize_chunk), prefetch=prefetch, **kw)


# ============================================================================ host utilities
def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _host_max(v: int) -> int:
    if jax.process_count() == 1:
        return int(v)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(v, np.int64))))


def _host_min(v: int) -> int:
    return -_host_max(-int(v))


def _atomic_write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def measure_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a jitted float32 ``n x n x n`` matmul on the default device, best of ``reps``
    (after one untimed call)."""
    f = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((n, n), jnp.float32)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


_measured_cpu_flops = functools.lru_cache(maxsize=None)(measure_matmul_flops)


def peak_flops_per_device(configured: float = -1.0, device=None) -> Tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained).  See the module docstring."""
    if configured and configured > 0:
        return float(configured), "configured"
    device = device or jax.local_devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, val in PEAK_FLOPS:
        if key in kind:
            return val, f"table ({key})"
    if device.platform == "cpu":
        return _measured_cpu_flops(), "measured (float32 matmul, whole host)"
    return float("nan"), f"unknown device kind {kind!r}"


def train_flops_per_token(cfg: ModelConfig, seq_len: int, n_lora: int = 0) -> float:
    """Executed training FLOPs per token slot (see the module docstring)."""
    full = cfg.flops_per_token(seq_len)
    if cfg.lora_rank <= 0:
        return full
    attn = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    n_matmul = (full - attn) / 6.0
    return full - 2.0 * n_matmul + 6.0 * n_lora


# ============================================================================ metrics
class MetricsLogger:
    """stdout (via tqdm.write when a bar is shown), TensorBoard and metrics.jsonl; process 0."""

    def __init__(self, workdir: str, lcfg, total_steps: int, start_step: int):
        self.main = jax.process_index() == 0
        self.history: List[dict] = []
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not self.main:
            return
        if lcfg.tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if lcfg.progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def write(self, step: int, prefix: str, values: Dict[str, float]):
        rec = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
        self.history.append(rec)
        if not self.main:
            return
        line = f"[{prefix} step {step}] " + " ".join(
            f"{k}={_fmt(v)}" for k, v in values.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
            self.tb.flush()
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def advance(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(v) -> str:
    v = float(v)
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4f}"
    return f"{v:.3e}"


# ============================================================================ checkpoints
class Checkpointer:
    """orbax CheckpointManager for the TrainState + per-process data-iterator JSON."""

    def __init__(self, workdir: str, ccfg, finite_fn: Callable = all_finite):
        import orbax.checkpoint as ocp
        self.ocp = ocp
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
        _atomic_write_json(self._data_path(step), {"data": data_state, **extra})
        self.mgr.save(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state)), force=True)
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

    def restore(self, abstract_state) -> Optional[Tuple[int, TrainState, dict]]:
        """Newest readable checkpoint: (step, state, data JSON) or None when there is none."""
        for step in sorted(self.steps(), reverse=True):
            try:
                r = self.mgr.restore(step, args=self.ocp.args.Composite(
                    state=self.ocp.args.StandardRestore(abstract_state)))
                state = r.state
                with open(self._data_path(step)) as f:
                    data = json.load(f)
                if int(jax.device_get(state.step)) != step:
                    raise ValueError(f"state.step={int(jax.device_get(state.step))} != {step}")
                if not bool(jax.device_get(self.finite_fn(state.params))):
                    raise ValueError("restored params are not finite")
                return step, state, data
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to "
                            "the previous one", step, self.dir, type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "")
                self._quarantine(step)
        return None

    def _quarantine(self, step: int):
        """Move an unreadable step out of orbax's way (kept for inspection)."""
        from jax.experimental import multihost_utils
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


# ============================================================================ preemption
class _Preemption:
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
        return _host_max(int(local)) > 0


# ============================================================================ model
def resolve_model_source(name: str) -> str:
    """Model ``name`` as given to :func:`regift_jax.models.load`; the offline default preset is
    resolved to its GGUF file directly (it needs no preset table)."""
    from regift_jax import models
    if os.path.exists(name):
        return name
    if name == models.DEFAULT_MODEL:
        from regift_jax.models.tokenizer import smollm2_gguf_path
        return smollm2_gguf_path()
    return name


def load_model(mcfg, lcfg, seed: int, mesh, rules):
    """(ModelConfig with LoRA/dtypes/remat, params placed on the mesh, tokenizer)."""
    from regift_jax import models
    handle = models.load(resolve_model_source(mcfg.name), dtype=mcfg.dtype,
                         param_dtype=mcfg.param_dtype, mesh=mesh, rules=rules,
                         download=bool(mcfg.download), remat_policy=mcfg.remat_policy,
                         attention_chunk=int(mcfg.attention_chunk),
                         loss_chunk=int(mcfg.loss_chunk),
                         attention_impl=str(mcfg.attention_impl))
    cfg, params = handle.cfg, handle.params
    if lcfg.enabled:
        cfg = cfg.replace(lora_rank=int(lcfg.rank), lora_alpha=float(lcfg.alpha),
                          lora_dropout=float(lcfg.dropout), lora_targets=tuple(lcfg.targets))
        cfg, params = lora_lib.add_lora(cfg, params, seed=seed, mesh=mesh, rules=rules)
    return cfg, params, handle.tokenizer


# ============================================================================ the run
def _validate(config):
    t = config.train
    if int(t.global_batch) <= 0 or int(t.grad_accum_steps) <= 0:
        raise ValueError("train.global_batch and train.grad_accum_steps must be > 0")
    if int(t.global_batch) % int(t.grad_accum_steps):
        raise ValueError(f"train.global_batch={t.global_batch} is not divisible by "
                         f"train.grad_accum_steps={t.grad_accum_steps}")
    if int(t.num_steps) <= 0 and float(t.num_epochs) <= 0:
        raise ValueError("set train.num_steps > 0 or train.num_epochs > 0")
    if not 0 <= float(config.data.eval_fraction) < 1:
        raise ValueError(f"data.eval_fraction={config.data.eval_fraction} not in [0, 1)")


def run(config, workdir: Optional[str] = None, *, callbacks: Sequence[Callable] = ()) -> dict:
    """Train according to ``config``; returns final metrics and paths (see ``train.run_training``).

    ``callbacks``: callables ``cb(step, trainer_info)`` run on every process after each step
    (``trainer_info`` is a dict with ``state``, ``checkpointer`` ...); for tests and extra stages.
    """
    t_start = time.time()
    workdir = workdir or config.workdir
    if not workdir:
        raise ValueError("no workdir: pass --workdir or --config.workdir")
    workdir = os.path.abspath(workdir)
    _validate(config)
    os.makedirs(workdir, exist_ok=True)
    if config.train.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(config.train.compilation_cache_dir))
    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)

    # ------------------------------------------------------------- examples (fail fast)
    examples, data_summary = load_examples(config.data)
    train_ex, eval_ex = split_heldout(examples, float(config.data.eval_fraction),
                                      str(config.data.eval_salt))
    if int(config.data.max_examples) > 0:
        train_ex = train_ex[:int(config.data.max_examples)]
    if not train_ex:
        raise ValueError(f"no training examples left (source summary: {data_summary})")

    # ------------------------------------------------------------- mesh and model
    mesh = shd.make_mesh({"data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp),
                          "tensor": int(config.mesh.tensor)})
    from regift_jax.core.configs_util import merge_rules
    rules = merge_rules(shd.DEFAULT_RULES, config.mesh.rules)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, nproc)
    model_cfg, params, tokenizer = load_model(config.model, config.lora, int(config.seed), mesh,
                                              rules)
    trainable, frozen, trainable_sh, frozen_sh = split_trainable(model_cfg, params, mesh, rules)
    del params
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    log.info("params: %d trainable, %d frozen", n_trainable, n_frozen)

    # ------------------------------------------------------------- data
    render, template_id = make_render(config.data, tokenizer)
    gb = int(config.train.global_batch)
    k = int(config.train.grad_accum_steps)
    batch_sh = shd.batch_sharding(mesh, rules)
    n_batch_shards = shd._axes_size(mesh, batch_sh.spec[0]) if batch_sh.spec[0] else 1
    if gb % (k * n_batch_shards):
        raise ValueError(f"train.global_batch={gb} must be divisible by grad_accum_steps ({k}) x "
                         f"batch shards ({n_batch_shards}: mesh axes {batch_sh.spec[0]})")
    data_axes = batch_sh.spec[0]

    steps_per_epoch = None
    if int(config.train.num_steps) > 0:
        total_steps = int(config.train.num_steps)
    else:
        counter = make_pipeline(train_ex, tokenizer, render, config.data, global_batch=gb,
                                seed=int(config.seed), num_epochs=1,
                                shuffle=bool(config.data.shuffle), prefetch=0)
        steps_per_epoch = _host_min(sum(1 for _ in counter))
        total_steps = max(1, int(math.ceil(float(config.train.num_epochs) * steps_per_epoch)))
        log.info("%d steps per epoch x %s epochs = %d steps", steps_per_epoch,
                 config.train.num_epochs, total_steps)
    train_pipe = make_pipeline(train_ex, tokenizer, render, config.data, global_batch=gb,
                               seed=int(config.seed), num_epochs=None,
                               shuffle=bool(config.data.shuffle),
                               prefetch=int(config.data.prefetch))
    eval_batches = _eval_batches(eval_ex, tokenizer, render, config, gb)

    # ------------------------------------------------------------- optimizer and state
    tx, schedule = make_optimizer(config.optim, total_steps, trainable)
    repl = NamedSharding(mesh, P())
    state_sh, opt_abstract = state_shardings(tx, trainable, trainable_sh, mesh)
    opt_sh = state_sh.opt_state
    ckpt = Checkpointer(workdir, config.checkpoint,
                        finite_fn=jax.jit(all_finite, out_shardings=repl))
    start_step, state = 0, None
    if config.checkpoint.resume:
        # Restore into abstract arrays: the fresh optimizer state is never materialised.
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
        abstract = TrainState(
            step=scalar, applied=scalar, skipped=scalar, bad_streak=scalar,
            params=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                trainable, trainable_sh),
            opt_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                     sharding=s),
                                   opt_abstract, opt_sh),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl))
        restored = ckpt.restore(abstract)
        if restored is not None:
            start_step, state, data_json = restored
            train_pipe.set_state(data_json["data"])
            log.info("resumed from step %d (%s)", start_step, ckpt.dir)
    elif ckpt.steps():
        raise ValueError(f"{ckpt.dir} already holds checkpoints {ckpt.steps()} and "
                         "checkpoint.resume is False: use a new workdir (or resume)")
    if state is None:
        state = init_state(tx, trainable, state_sh, int(config.seed))
    del trainable

    step_fn = jit_train_step(model_cfg, tx, schedule, state_sh, frozen_sh, batch_sh, accum=k)
    eval_fn = jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
                      in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)

    # ------------------------------------------------------------- metrics
    seq_len = int(config.data.seq_len)
    flops_tok = train_flops_per_token(model_cfg, seq_len, n_trainable if config.lora.enabled
                                      else 0)
    peak, peak_src = peak_flops_per_device(float(config.log.peak_flops_per_device))
    on_cpu = jax.local_devices()[0].platform == "cpu"
    total_peak = peak * (nproc if on_cpu else jax.device_count())
    logger = MetricsLogger(workdir, config.log, total_steps, start_step)
    if pid == 0:
        log.info("MFU peak: %.3e FLOP/s per %s (%s); %.3e train FLOPs per token slot",
                 peak, "process" if on_cpu else "device", peak_src, flops_tok)
    info = {"config": config, "workdir": workdir, "mesh": mesh, "model_cfg": model_cfg,
            "checkpointer": ckpt, "pipeline": train_pipe, "total_steps": total_steps}
    preempt = _Preemption()
    preempt.install()
    last_metrics: Dict[str, float] = {}
    last_eval: Dict[str, float] = {}
    preempted = False
    saved_steps: List[int] = []

    def save(step_now):
        ok = ckpt.save(step_now, state, train_pipe.get_state(),
                       {"step": step_now, "template": template_id})
        if ok:
            saved_steps.append(step_now)

    def evaluate(step_now):
        if not eval_batches:
            return {}
        sums = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
        outs = [eval_fn(state.params, frozen, _global_batch(b, mesh, data_axes))
                for b in eval_batches]
        for o in jax.device_get(outs):
            for kk in sums:
                sums[kk] += float(o[kk])
        n = max(sums["tokens"], 1.0)
        vals = {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n,
                "tokens": sums["tokens"]}
        logger.write(step_now, "eval", vals)
        return vals

    try:
        if config.eval.at_start and start_step == 0:
            last_eval = evaluate(0)
        step = start_step
        log.info("setup done in %.1f s (steps %d -> %d)", time.time() - t_start, start_step,
                 total_steps)
        pending: List[Tuple[int, Any]] = []
        prev = None
        t_log = time.perf_counter()
        log_every = max(int(config.log.every_steps), 1)
        while step < total_steps:
            batch = next(train_pipe)
            gbatch = _global_batch(batch, mesh, data_axes)
            state, metrics = step_fn(state, frozen, gbatch)
            step += 1
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                log.info("first step (with compilation) done at %.1f s", time.time() - t_start)
            pending.append((step, metrics))
            # Halting check one step late: the device queue keeps one step in flight.
            if prev is not None:
                streak = int(jax.device_get(prev[1]["bad_streak"]))
                if streak >= int(config.train.max_nonfinite_in_a_row):
                    raise NonFiniteError(
                        f"halting at step {prev[0]}: {streak} consecutive steps with a "
                        f"non-finite loss or gradient (train.max_nonfinite_in_a_row="
                        f"{config.train.max_nonfinite_in_a_row}); the state was left unchanged "
                        f"by those steps and the last checkpoint is {saved_steps[-1:] or 'none'}")
            prev = (step, metrics)
            if step % log_every == 0 or step == total_steps:
                host = jax.device_get([m for _, m in pending])
                dt = time.perf_counter() - t_log
                t_log = time.perf_counter()
                last_metrics = _summarise(host, dt, len(pending) * gb * seq_len, flops_tok,
                                          total_peak)
                logger.write(step, "train", last_metrics)
                logger.advance(len(pending), loss=last_metrics["loss"])
                pending = []
            if int(config.eval.every_steps) > 0 and step % int(config.eval.every_steps) == 0 \
                    and step < total_steps:
                last_eval = evaluate(step)
            every = int(config.checkpoint.every_steps)
            if every > 0 and step % every == 0 and step < total_steps:
                save(step)
            for cb in callbacks:
                cb(step, {**info, "state": state})
            if preempt.requested():
                log.warning("SIGTERM received: saving a checkpoint at step %d and exiting", step)
                save(step)
                ckpt.wait()
                preempted = True
                break
        if prev is not None:
            streak = int(jax.device_get(prev[1]["bad_streak"]))
            if streak >= int(config.train.max_nonfinite_in_a_row):
                raise NonFiniteError(
                    f"halting at step {prev[0]}: {streak} consecutive non-finite steps")
        if not preempted:
            if pending:
                host = jax.device_get([m for _, m in pending])
                last_metrics = _summarise(host, time.perf_counter() - t_log,
                                          len(pending) * gb * seq_len, flops_tok, total_peak)
                logger.write(step, "train", last_metrics)
                logger.advance(len(pending))
            last_eval = evaluate(step) or last_eval
            save(step)
        ckpt.wait()
    finally:
        preempt.uninstall()
        logger.close()
        train_pipe.close()
        ckpt.wait()  # never leave a save half-written behind an exception

    export_dir = ""
    if not preempted and config.export.enabled:
        export_dir = config.export.path or os.path.join(workdir, "export")
        export_model(model_cfg, state.params, frozen, tokenizer, export_dir,
                     str(config.export.dtype))
    skipped = int(jax.device_get(state.skipped))
    ckpt.close()
    pstats = train_pipe.stats.to_dict()
    tok_stats = pstats["tokenize"]
    log.info("data: %d examples read, %d kept (%d with truncated reasoning), dropped %s; packing "
             "efficiency %.3f", tok_stats["seen"], tok_stats["kept"], tok_stats["truncated"],
             tok_stats["dropped"] or "none", pstats["packing_efficiency"])
    if tok_stats["dropped"]:
        log.warning("%d of %d training examples read were dropped by tokenization: %s "
                    "(see data.seq_len / data.overlong)", sum(tok_stats["dropped"].values()),
                    tok_stats["seen"], tok_stats["dropped"])
    result = {
        "step": int(jax.device_get(state.step)), "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch, "preempted": preempted,
        "skipped_steps": skipped, "train": last_metrics, "eval": last_eval,
        "workdir": workdir, "checkpoint_dir": ckpt.dir,
        "checkpoint_steps": sorted(set(saved_steps)),
        "tensorboard_dir": os.path.join(workdir, "tensorboard") if config.log.tensorboard else "",
        "metrics_file": os.path.join(workdir, "metrics.jsonl"), "export_dir": export_dir,
        "data": data_summary, "template": template_id,
        "num_train_examples": len(train_ex), "num_eval_examples": len(eval_ex),
        "pipeline_stats": pstats,
        "trainable_params": n_trainable, "frozen_params": n_frozen,
        "wall_time_s": time.time() - t_start, "history": logger.history,
    }
    if pid == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "history"}, f, indent=1,
                      default=str)
    result["state"] = state
    result["frozen"] = frozen
    result["model_cfg"] = model_cfg
    return result


def _global_batch(batch, mesh, data_axes):
    from regift_jax.data.pipeline import make_global_array
    return make_global_array(batch, mesh, data_axes)


def _summarise(host: List[dict], dt: float, slots: int, flops_tok: float, total_peak: float):
    tokens = sum(float(m["tokens"]) for m in host)
    loss = sum(float(m["loss"]) * float(m["tokens"]) for m in host) / max(tokens, 1.0)
    correct = sum(float(m["correct"]) for m in host)
    nonpad = sum(float(m["nonpad"]) for m in host)
    steps = len(host)
    out = {
        "loss": loss, "accuracy": correct / max(tokens, 1.0),
        "learning_rate": float(host[-1]["learning_rate"]),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in host])),
        "tokens_per_s": nonpad / dt if dt > 0 else float("nan"),
        "step_time_s": dt / steps,
        "mfu": (slots * flops_tok / dt) / total_peak if dt > 0 and total_peak > 0 else float(
            "nan"),
        "skipped": float(host[-1]["skipped"]),
    }
    if steps == 1:
        out["loss"] = float(host[0]["loss"])
    return out


def _eval_batches(eval_ex, tokenizer, render, config, gb):
    """The held-out batches of this process, cached; every process gets the same count (short
    ones are padded with empty batches, which contribute nothing)."""
    if not eval_ex:
        return []
    nproc, pid = jax.process_count(), jax.process_index()
    local = []
    if eval_ex[pid::nproc]:
        pipe = make_pipeline(eval_ex, tokenizer, render, config.data, global_batch=gb,
                             seed=int(config.seed), num_epochs=1, shuffle=False, prefetch=0)
        local = list(pipe)
    n = _host_max(len(local))
    if int(config.eval.max_batches) > 0:
        n = min(n, int(config.eval.max_batches))
    lb = gb // nproc
    L = int(config.data.seq_len)
    from regift_jax.data.packing import FIELDS
    empty = {f: np.zeros((lb, L), np.int32) for f in FIELDS}
    return (local + [empty] * n)[:n]


def export_model(model_cfg: ModelConfig, trainable, frozen, tokenizer, path: str,
                 dtype: str = "float32") -> str:
    """Combine, gather to host, merge LoRA and write an HF directory (process 0 writes)."""
    from regift_jax.models.checkpoints import export_hf
    params = lora_lib.combine(trainable, frozen)
    host = jax.tree.map(to_host, params)
    if jax.process_index() == 0:
        cfg = model_cfg
        if cfg.lora_rank > 0:
            cfg, host = lora_lib.merge_lora(cfg, host)
            host = jax.tree.map(np.asarray, host)
        export_hf(path, cfg, host, tokenizer=tokenizer, dtype=dtype)
        log.info("exported %s to %s", "LoRA-merged model" if model_cfg.lora_rank else "model",
                 path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("export_done")
    return path
