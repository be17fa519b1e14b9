"""The loss and the pure train step (jitted once with explicit shardings, the state donated).

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
such steps and ``bad_streak`` the current run of them.  The loop halts with
:class:`NonFiniteError` (:func:`check_nonfinite`) once ``bad_streak`` reaches
``train.max_nonfinite_in_a_row``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from regift_jax.models import lora as lora_lib
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import Decoder, head_weight
from regift_jax.models.head_loss import head_loss
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig
from regift_jax.training.state import TrainState


class NonFiniteError(RuntimeError):
    """Training halted after too many consecutive non-finite steps."""


def check_nonfinite(step: int, metrics, limit: int, last_checkpoint) -> None:
    """Raise :class:`NonFiniteError` when step ``step``'s ``metrics["bad_streak"]`` reached
    ``limit`` (``train.max_nonfinite_in_a_row``)."""
    streak = int(jax.device_get(metrics["bad_streak"]))
    if streak >= limit:
        raise NonFiniteError(
            f"halting at step {step}: {streak} consecutive steps with a non-finite loss or "
            f"gradient (train.max_nonfinite_in_a_row={limit}); the state was left unchanged by "
            f"those steps and the last checkpoint is {last_checkpoint}")


# ============================================================================ loss
def token_loss(logits, targets, loss_mask):
    """(sum of masked token NLL, number of loss tokens, number of correct argmax predictions)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = loss_mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(correct * m)


def _forward(model_cfg, params, batch, rng, deterministic, return_hidden=False, *,
             run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA):
    """The decoder on ``batch["inputs"]``; a batch without ``positions``/``segment_ids`` is one
    unpadded sequence per row (plain causal attention; the data pipeline always gives both)."""
    rngs = None if deterministic else {"dropout": rng}
    return Decoder(model_cfg, run, lora).apply({"params": params}, batch["inputs"],
                                               positions=batch.get("positions"),
                                               segment_ids=batch.get("segment_ids"),
                                               deterministic=deterministic, rngs=rngs,
                                               return_hidden=return_hidden)


def batch_loss(model_cfg, params, batch, rng, deterministic, *, run: RunConfig = RunConfig(),
               lora: LoraConfig = NO_LORA):
    """(summed masked NLL, loss tokens, correct argmax predictions) of one batch.  With
    ``run.loss_chunk > 0`` the LM head and the loss run on the loss positions only
    (:func:`regift_jax.models.head_loss.head_loss`); otherwise on full logits (:func:`token_loss`).
    """
    kw = dict(run=run, lora=lora)
    if run.loss_chunk <= 0:
        logits = _forward(model_cfg, params, batch, rng, deterministic, **kw)
        return token_loss(logits, batch["targets"], batch["loss_mask"])
    hidden = _forward(model_cfg, params, batch, rng, deterministic, return_hidden=True, **kw)
    w, vocab_major = head_weight(params, model_cfg)
    return head_loss(hidden, w, batch["targets"], batch["loss_mask"],
                     chunk=run.loss_chunk, vocab_major=vocab_major, dtype=run.dtype)


def micro_batches(batch, k: int, batch_sharding=None):
    """[B, T] -> [k, B/k, T]; micro-batch j holds rows j, j+k, j+2k, ... (device-local)."""
    def one(x):
        B = x.shape[0]
        y = x.reshape((B // k, k) + x.shape[1:]).swapaxes(0, 1)
        if batch_sharding is not None:
            spec = P(None, *batch_sharding.spec)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(batch_sharding.mesh, spec))
        return y
    return jax.tree.map(one, batch)


def _value_and_grad(fn, p, b, key):
    (s, aux), g = jax.value_and_grad(fn, has_aux=True)(p, b, key)
    return (g, aux), s


def loss_and_grads(trainable, frozen, batch, rng, *, model_cfg: ModelConfig, accum: int = 1,
                   batch_sharding=None, param_shardings=None, run: RunConfig = RunConfig(),
                   lora: LoraConfig = NO_LORA):
    """Per-token mean loss over the whole batch and its gradient w.r.t. ``trainable``.

    Returns ``(grads, {"loss", "tokens", "correct"})`` with ``grads`` = d(mean loss)/d(params);
    ``accum`` micro-batches are scanned (see the module docstring).  ``param_shardings`` (of
    ``trainable``) pins the gradient accumulator to the parameters' sharding (FSDP: never a
    replicated full-size gradient)."""
    def summed(p, b, key):
        s, n, c = batch_loss(model_cfg, lora_lib.combine(p, frozen), b, key, deterministic=False,
                             run=run, lora=lora)
        return s, (n, c)

    def micro(p, b, key):
        (g, (n, c)), s = _value_and_grad(summed, p, b, key)
        return g, s, n, c

    if accum == 1:
        g, s, n, c = micro(trainable, batch, jax.random.fold_in(rng, 0))
    else:
        mb = micro_batches(batch, accum, batch_sharding)

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


# ============================================================================ the step
def train_step(state: TrainState, frozen, batch, *, model_cfg: ModelConfig, tx, schedule,
               accum: int = 1, batch_sharding=None, param_shardings=None,
               run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA):
    """One optimizer step (pure).  Returns ``(new_state, metrics)``; see the module docstring."""
    rng = jax.random.fold_in(state.rng, state.step)
    grads, aux = loss_and_grads(state.params, frozen, batch, rng, model_cfg=model_cfg,
                                accum=accum, batch_sharding=batch_sharding,
                                param_shardings=param_shardings, run=run, lora=lora)
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


def jit_train_step(model_cfg: ModelConfig, tx, schedule, state_sh: TrainState, frozen_sh,
                   batch_sh, accum: int = 1, *, run: RunConfig = RunConfig(),
                   lora: LoraConfig = NO_LORA):
    """:func:`train_step` jitted with explicit in/out shardings and the state donated:
    ``step_fn(state, frozen, batch) -> (state, metrics)``."""
    return jax.jit(functools.partial(train_step, model_cfg=model_cfg, tx=tx, schedule=schedule,
                                     accum=accum, batch_sharding=batch_sh,
                                     param_shardings=state_sh.params, run=run, lora=lora),
                   in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, state_sh.step), donate_argnums=(0,))


def eval_step(params, frozen, batch, *, model_cfg: ModelConfig, run: RunConfig = RunConfig(),
              lora: LoraConfig = NO_LORA):
    """Summed masked NLL, loss tokens and correct predictions of one batch (deterministic)."""
    s, n, c = batch_loss(model_cfg, lora_lib.combine(params, frozen), batch, None, True,
                         run=run, lora=lora)
    return {"loss_sum": s, "tokens": n, "correct": c}


def jit_eval_step(model_cfg: ModelConfig, trainable_sh, frozen_sh, batch_sh, repl, *,
                  run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA):
    """:func:`eval_step` jitted: ``eval_fn(params, frozen, batch) -> sums`` (replicated)."""
    return jax.jit(functools.partial(eval_step, model_cfg=model_cfg, run=run, lora=lora),
                   in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)
