"""The train state: what training changes, how it is sharded, and the model it trains.

:class:`TrainState` holds only what training changes: ``step`` (batches consumed), the
*trainable* ``params``, the optax ``opt_state``, the base ``rng`` key and non-finite-step
counters.  With LoRA the trainable params are the adapter leaves only
(:func:`regift_jax.models.lora.split`); the frozen base weights are a separate argument of the
step, never differentiated, never in the optimizer state and never checkpointed (on resume they
are reloaded from the model source, which must therefore not change between runs).  With full
fine-tuning every weight is trainable and the frozen tree is empty.

Parameter shardings come from the one logical-axis rules table
(:data:`regift_jax.core.sharding.DEFAULT_RULES`, entries overridable by ``config.mesh.rules``); the
optimizer state is sharded like the parameters it mirrors (``optax.tree_map_params``); scalars
are replicated.

At the end the trainable params are combined with the base, LoRA is merged
(:func:`regift_jax.models.lora.merge_lora`) and the model is written as a Hugging Face directory
(:func:`regift_jax.models.checkpoints.export_hf`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from regift_jax import models
from regift_jax.core import sharding as shd
from regift_jax.models import lora as lora_lib
from regift_jax.models.checkpoints import export_hf
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import param_shardings
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig, resolve_attention_impl
from regift_jax.models.tokenizer import smollm2_gguf_path
from regift_jax.training.hosts import to_host

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed (skipped steps included)
    params: Any  # trainable params (LoRA leaves, or everything for full fine-tuning)
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)
    applied: jax.Array  # int32: optimizer updates applied (= the schedule's step)
    skipped: jax.Array  # int32: non-finite steps skipped in total
    bad_streak: jax.Array  # int32: current run of consecutive skipped steps


# ============================================================================ the model
def resolve_model_source(name: str) -> str:
    """Model ``name`` as given to :func:`regift_jax.models.load`; the offline default preset is
    resolved to its GGUF file directly (it needs no preset table)."""
    if os.path.exists(name):
        return name
    if name == models.DEFAULT_MODEL:
        return smollm2_gguf_path()
    return name


def run_config(mcfg, platform: Optional[str] = None) -> RunConfig:
    """The :class:`RunConfig` of a config's ``model`` section (dtypes, remat, attention, loss);
    ``attention_impl="auto"`` resolved for ``platform`` (default: JAX's default backend)."""
    impl = resolve_attention_impl(str(mcfg.attention_impl), platform or jax.default_backend())
    return RunConfig(param_dtype=str(mcfg.param_dtype), dtype=str(mcfg.dtype),
                     remat_policy=str(mcfg.remat_policy),
                     attention_chunk=int(mcfg.attention_chunk), loss_chunk=int(mcfg.loss_chunk),
                     attention_impl=impl)


def lora_config(lcfg) -> LoraConfig:
    """The :class:`LoraConfig` of a config's ``lora`` section (rank 0 when not enabled)."""
    if not lcfg.enabled:
        return NO_LORA
    return LoraConfig(rank=int(lcfg.rank), alpha=float(lcfg.alpha), dropout=float(lcfg.dropout),
                      targets=tuple(lcfg.targets))


def load_model(mcfg, lcfg, seed: int, mesh, rules) -> models.ModelHandle:
    """The model of the ``model``/``lora`` config sections: its architecture, ``run`` and
    ``lora`` settings, params (fresh adapters added) placed on the mesh, and tokenizer."""
    run, lora = run_config(mcfg), lora_config(lcfg)
    handle = models.load(resolve_model_source(mcfg.name), mesh=mesh, rules=rules,
                         download=bool(mcfg.download), **dataclasses.asdict(run))
    if lora.enabled:
        handle.params = lora_lib.add_lora(handle.cfg, lora, handle.params, seed=seed, mesh=mesh,
                                          rules=rules)
        handle.lora = lora
    return handle


def split_trainable(model_cfg: ModelConfig, lora: LoraConfig, params, mesh,
                    rules=shd.DEFAULT_RULES, run: RunConfig = RunConfig()):
    """``(trainable, frozen, trainable_shardings, frozen_shardings)``: with LoRA
    (``lora.rank > 0``) the adapters train and the base weights are frozen (and never enter the
    optimizer state); without it every parameter trains and ``frozen`` is ``{}``."""
    full_sh = param_shardings(model_cfg, mesh, rules, run, lora)
    if lora.enabled:
        return (*lora_lib.split(params), *lora_lib.split(full_sh))
    return params, {}, full_sh, {}


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ============================================================================ the state
def state_shardings(tx, trainable, trainable_sh, mesh) -> Tuple[TrainState, Any]:
    """(a :class:`TrainState` of shardings, the abstract optimizer state): optimizer moments
    follow their parameters' sharding, scalars are replicated."""
    repl = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, trainable_sh,
                                   transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=trainable_sh, opt_state=opt_sh, rng=repl,
                      applied=repl, skipped=repl, bad_streak=repl), opt_abstract


def abstract_state(trainable, opt_abstract, state_sh: TrainState) -> TrainState:
    """The state as sharded ``ShapeDtypeStruct`` s: a checkpoint is restored into these, so the
    fresh optimizer state is never materialised."""
    def spec(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh.step)
    return TrainState(step=scalar, applied=scalar, skipped=scalar, bad_streak=scalar,
                      params=jax.tree.map(spec, trainable, state_sh.params),
                      opt_state=jax.tree.map(spec, opt_abstract, state_sh.opt_state),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=state_sh.rng))


def init_state(tx, trainable, state_sh: TrainState, seed: int) -> TrainState:
    """A fresh train state placed on ``state_sh`` (the optimizer state is built sharded)."""
    init_opt = jax.jit(tx.init, out_shardings=state_sh.opt_state)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: state is donated)
    state = TrainState(step=z(), params=trainable, opt_state=init_opt(trainable),
                       rng=jax.random.PRNGKey(int(seed)), applied=z(), skipped=z(),
                       bad_streak=z())
    return jax.device_put(state, state_sh)


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# ============================================================================ export
def export_model(model_cfg: ModelConfig, lora: LoraConfig, trainable, frozen, tokenizer,
                 path: str, dtype: str = "float32") -> str:
    """Combine, gather to host, merge LoRA and write an HF directory (process 0 writes)."""
    params = lora_lib.combine(trainable, frozen)
    host = jax.tree.map(to_host, params)
    if jax.process_index() == 0:
        if lora.enabled:
            host = jax.tree.map(np.asarray, lora_lib.merge_lora(lora, host))
        export_hf(path, model_cfg, host, tokenizer=tokenizer, dtype=dtype)
        log.info("exported %s to %s", "LoRA-merged model" if lora.enabled else "model", path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("export_done")
    return path
