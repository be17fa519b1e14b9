"""The programs a config runs, built abstractly: parameters, optimizer state, KV caches and batches
as sharded ``jax.ShapeDtypeStruct`` s (no weights, no data), lowered by the product's own jitted
functions for any layer count.

* train configs: :func:`regift_jax.training.step.jit_train_step` over the state of
  :mod:`regift_jax.training.state` (LoRA or full fine-tuning as configured, the optimizer of
  :mod:`regift_jax.training.optim`);
* teacher configs: :func:`regift_jax.models.sampling.prefill` and one
  :func:`~regift_jax.models.sampling.decode_chunk` with its KV cache, sharded as prefill leaves it;
* eval configs: the BBQ log-likelihood forward over packed rows (the decoder's hidden states, the
  LM head on the scored positions; as ``eval.loglik``'s packed method computes it), or the
  sampler's prefill and decode for ``mode=generate``.

A :class:`Stage` builds its program at any depth (``build(num_layers, costing)``): the real depth
is compiled for memory; shallow "costing" variants let :mod:`regift_jax.preflight.estimate` count
what XLA's cost analysis counts only once (loop bodies): costing variants of the train step run
one micro-batch (``build(0, True, chunk_scale=2)`` doubles the LM-head loss chunk, so that one
chunk's cost can be told from the rest); the decode step is costed as the sampler's ``extend``
of one token per row into a full cache, and prefill as ``extend`` of the prompts into an empty
one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from regift_jax.core import sharding as shd
from regift_jax.core.configs_util import merge_rules
from regift_jax.core.shapes import round_up
from regift_jax.data.packing import FIELDS
from regift_jax.models import presets, sampling, splash
from regift_jax.models.checkpoints import gguf_hf_config, open_gguf, read_hf_config
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import (PROJECTIONS, Decoder, init_cache, lm_head,
                                       param_shardings, proj_shapes, trace_context)
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig
from regift_jax.training import inputs
from regift_jax.training import state as state_lib
from regift_jax.training.metrics import train_flops_per_token
from regift_jax.training.optim import make_optimizer
from regift_jax.training.step import jit_train_step

#: Positions scored per packed row by the BBQ forward (options of a few items; an assumption).
SCORED_PER_ROW = 64


class PreflightError(ValueError):
    """A config the preflight cannot build a program for (the message says why)."""


@dataclasses.dataclass
class Variant:
    """One lowered program and the sharded state it holds."""
    lowered: Any
    params: Any
    opt_state: Any = None
    cache: Any = None


@dataclasses.dataclass
class Stage:
    """One program of a config: how to build it at any depth and what one call of it does."""
    name: str  # train | prefill | decode | score
    cfg: ModelConfig  # the real model config (full depth)
    mesh: Any
    build: Callable[..., Variant]  # (num_layers, costing) -> Variant
    tokens: int  # tokens one call processes (global)
    model_flops: float  # model FLOPs of one call (global; the MFU numerator)
    executed_flops: Callable[[int], float]  # analytic FLOPs the costing program runs at a depth
    accum: int = 1  # train: micro-batches per step
    rows: int = 0  # train: rows of the global batch
    batch_shards: int = 1  # train: shards of the batch (mesh axes of the batch rule)
    layer_params: int = 0  # train: trainable parameters of one layer
    head_chunks: int = 0  # train: trips of the LM-head loss loop, a loss on every slot (0: none)
    layer_depth: int = 1  # costing depth whose layer is a layer as every layer runs it (1 or 2)
    end_params: int = 0  # train: trainable parameters outside the layers
    # FLOPs of one layer (one call or micro-batch, all chips) inside custom kernels, which XLA's
    # cost model cannot see (splash attention): the estimate adds them analytically
    kernel_layer_flops: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)
    run: RunConfig = RunConfig()  # how the program computes (dtypes, remat, attention)
    lora: LoraConfig = NO_LORA


# ============================================================================ models and meshes
def model_config(name: str, **overrides) -> ModelConfig:
    """The architecture of a preset name, Hugging Face directory or GGUF file (no weights)."""
    if os.path.isdir(name):
        hf = read_hf_config(name)
    elif os.path.isfile(name) and name.endswith(".gguf"):
        hf = gguf_hf_config(open_gguf(name), name)
    else:
        try:
            return presets.get_model_config(name, **overrides)
        except ValueError as e:
            raise PreflightError(f"model {name!r}: {e}") from None
    return ModelConfig.from_hf_config(hf, **overrides)


def make_mesh(shape, devices, what: str):
    try:
        return shd.make_mesh(dict(shape), devices=list(devices))
    except ValueError as e:
        raise PreflightError(f"{what}: {e}") from None


def parse_mesh(spec: Optional[str]) -> Optional[dict]:
    """``"data=1,fsdp=-1,tensor=2"`` -> dict; None/"" -> None (one chip, unsharded)."""
    if not spec:
        return None
    out = {}
    for part in str(spec).split(","):
        k, _, v = part.partition("=")
        if k.strip() not in shd.MESH_AXES or not v.strip().lstrip("-").isdigit():
            raise PreflightError(f"mesh {spec!r}: bad entry {part!r} (expected AXIS=N with AXIS "
                                 f"in {', '.join(shd.MESH_AXES)})")
        out[k.strip()] = int(v)
    return out


def abstract_params(cfg: ModelConfig, mesh, rules, run: RunConfig = RunConfig(),
                    lora: LoraConfig = NO_LORA):
    """The decoder's parameters as sharded ``ShapeDtypeStruct`` s (abstract init)."""
    shapes = jax.eval_shape(lambda: Decoder(cfg, run, lora).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(shapes), param_shardings(cfg, mesh, rules, run, lora))


def _sds(shape, dtype, sharding=None):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _attention_keys(run: RunConfig, T: int) -> float:
    """Mean keys per query the attention computes without a cache (causal query chunks, and the
    splash kernel's blocks, skip the keys after the chunk)."""
    c = run.attention_chunk
    if run.attention_impl == "splash":  # the kernel skips blocks above the causal diagonal
        c = splash.block_size(T)
    if run.attention_impl in ("einsum", "splash") and c and T > c:
        n = -(-T // c)
        return c * (n + 1) / 2.0
    return float(T)


def _attention_flops(cfg: ModelConfig, run: RunConfig, T: int) -> float:
    """Forward FLOPs per token of one layer's attention products (scores and values)."""
    return 4.0 * cfg.num_heads * cfg.head_dim * _attention_keys(run, T)


def _train_attention_flops(cfg: ModelConfig, run: RunConfig, T: int) -> float:
    """Train-step FLOPs per token of one layer's attention products: forward, backward (twice the
    forward) and the remat policy's recomputation of the forward."""
    recompute = run.remat_policy in ("full", "nothing_saveable", "dots_with_no_batch_dims")
    return _attention_flops(cfg, run, T) * (3 + recompute)


#: The projections that end a residual branch: nothing in the backward pass needs their output,
#: so a rematerialised layer does not recompute them.
BRANCH_ENDS = ("o_proj", "down_proj")


def _matmul_params(cfg: ModelConfig, lora: LoraConfig = NO_LORA) -> tuple:
    """(projection weights of one layer, LoRA adapter weights of one layer, weights of the
    :data:`BRANCH_ENDS`)."""
    dense = adapters = ends = 0
    for name in PROJECTIONS:
        n_in, n_out = (int(np.prod(s)) for s in proj_shapes(cfg, name))
        dense += n_in * n_out
        ends += n_in * n_out if name in BRANCH_ENDS else 0
        if lora.applies_to(name):
            adapters += lora.rank * (n_in + n_out)
    return dense, adapters, ends


# ============================================================================ training
def _train_model_config(config) -> Tuple[ModelConfig, RunConfig, LoraConfig]:
    """(architecture, run settings, LoRA) of a training config, as the trainer builds them."""
    return (model_config(str(config.model.name)), state_lib.run_config(config.model, "tpu"),
            state_lib.lora_config(config.lora))


def train_executed_flops(cfg: ModelConfig, run: RunConfig, lora: LoraConfig, tokens: int,
                         T: int, head_slots: Optional[int] = None) -> float:
    """FLOPs the train step's matmuls execute for ``tokens`` slots of rows of ``T`` with the loss
    on every slot: forward, backward (input gradients; weight gradients of what trains) and the
    recomputation of the remat policy (all but the :data:`BRANCH_ENDS` for ``full``, attention's
    batched dots for ``dots_with_no_batch_dims``), attention as computed (causal chunks skip
    keys); the LM head on ``head_slots`` positions (default ``tokens``; the loss loop pads each
    shard's positions to whole chunks)."""
    full = not lora.enabled
    dense, adapters, branch_ends = _matmul_params(cfg, lora)
    rec_mm = run.remat_policy in ("full", "nothing_saveable")
    per_layer = (2.0 * dense * (2 + full) + 2.0 * (dense - branch_ends) * rec_mm
                 + _train_attention_flops(cfg, run, T) + 2.0 * adapters * (3 + rec_mm))
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * (2 + full)
    slots = tokens if head_slots is None else head_slots
    return float(tokens) * cfg.num_layers * per_layer + float(slots) * head


def _train_final_norm(trainable, frozen, tr_sh, fr_sh):
    """LoRA without layers trains nothing, so autodiff would skip the LM head's input gradient
    that every real step computes; training the final norm's scale (D weights) keeps it."""
    move = lambda a, b: ({**a, "norm": b["norm"]},  # noqa: E731
                         {k: v for k, v in b.items() if k != "norm"})
    (trainable, frozen), (tr_sh, fr_sh) = move(trainable, frozen), move(tr_sh, fr_sh)
    return trainable, frozen, tr_sh, fr_sh


def train_stage(config, devices) -> Stage:
    """The train step of a training config on ``devices``."""
    rules = merge_rules(shd.DEFAULT_RULES, config.mesh.rules)
    mesh = make_mesh({a: int(config.mesh[a]) for a in shd.MESH_AXES}, devices, "config.mesh")
    cfg, run, lora = _train_model_config(config)
    B, T = int(config.train.global_batch), int(config.data.seq_len)
    try:  # micro-batches per step as the trainer counts them (train.micro_batch first)
        k = inputs.accum_steps(config.train)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    batch_sh = shd.batch_sharding(mesh, rules)
    n = shd.batch_shards(mesh, rules)
    if k <= 0 or B % (k * n):
        raise PreflightError(f"train.global_batch={B} must be divisible by {k} micro-batches x "
                             f"batch shards ({n}: mesh {dict(mesh.shape)})")

    def build(num_layers: int, costing: bool, chunk_scale: int = 1) -> Variant:
        m = cfg.replace(num_layers=num_layers)
        mrun = run.replace(loss_chunk=run.loss_chunk * chunk_scale)
        b, acc = (B // k, 1) if costing else (B, k)
        params = abstract_params(m, mesh, rules, mrun, lora)
        split = state_lib.split_trainable(m, lora, params, mesh, rules, run=mrun)
        if costing and num_layers == 0 and lora.enabled:
            split = _train_final_norm(*split)
        trainable, frozen, tr_sh, fr_sh = split
        tx, schedule = make_optimizer(config.optim, 1000, trainable)
        state_sh, opt_abstract = state_lib.state_shardings(tx, trainable, tr_sh, mesh)
        state = state_lib.abstract_state(trainable, opt_abstract, state_sh)
        batch = {f: _sds((b, T), jnp.int32, batch_sh) for f in FIELDS}
        step = jit_train_step(m, tx, schedule, state_sh, fr_sh, batch_sh, accum=acc, run=mrun,
                              lora=lora)
        with trace_context(mesh, mrun, rules):  # as the trainer traces it
            lowered = step.lower(state, frozen, batch)
        return Variant(lowered, params=params, opt_state=state.opt_state)

    dense, adapters, _ = _matmul_params(cfg, lora)
    # the loss loop runs on each batch shard's own rows, in whole chunks (a loss on every slot)
    chunks = -(-(B // k // n * T) // run.loss_chunk) if run.loss_chunk > 0 else 0
    slots = n * chunks * run.loss_chunk if chunks else None
    kernel = (B // k) * T * _train_attention_flops(cfg, run, T)
    n_lora = cfg.num_layers * adapters
    full_layer = (cfg.num_params() - cfg.replace(num_layers=0).num_params()) // cfg.num_layers
    ends = 0 if lora.enabled else cfg.replace(num_layers=0).num_params()
    per_layer = adapters if lora.enabled else full_layer
    return Stage("train", cfg, mesh, build, tokens=B * T,
                 model_flops=B * T * train_flops_per_token(cfg, T, n_lora),
                 executed_flops=lambda L: train_executed_flops(cfg.replace(num_layers=L), run,
                                                               lora, (B // k) * T, T, slots),
                 accum=k, rows=B, batch_shards=n, layer_params=per_layer, end_params=ends,
                 layer_depth=2,
                 head_chunks=chunks,
                 kernel_layer_flops=kernel if run.attention_impl == "splash" else 0.0,
                 run=run, lora=lora)


# ============================================================================ the sampler
def _abstract_cache(cfg: ModelConfig, run: RunConfig, B: int, S: int, mesh, rules):
    shapes = jax.eval_shape(lambda: init_cache(cfg, B, S, run.dtype))
    shardings = sampling.cache_shardings(mesh, rules, shapes)  # the sampler's own layout
    return {k: _sds(v.shape, v.dtype, shardings[k]) for k, v in shapes.items()}


def _inference_flops(cfg: ModelConfig, tokens: int, keys: float, head_rows: int) -> float:
    dense = _matmul_params(cfg)[0]
    att = 4.0 * cfg.num_heads * cfg.head_dim * keys
    return (float(tokens) * cfg.num_layers * (2.0 * dense + att)
            + 2.0 * head_rows * cfg.hidden_size * cfg.vocab_size)


def sampler_stages(cfg: ModelConfig, run: RunConfig, mesh, rules, B: int, T: int, S: int,
                   decode: dict, notes: List[str]) -> List[Stage]:
    """The sampler's prefill of ``B`` prompts of ``T`` tokens into a cache of ``S`` slots, and
    one decode chunk (``decode``: n_steps, temperature, top_p, top_k, max_new)."""
    batch = lambda nd: shd.batch_sharding(mesh, rules, ndim=nd)  # noqa: E731
    repl = NamedSharding(mesh, P())

    def prefill(num_layers: int, costing: bool) -> Variant:
        m = cfg.replace(num_layers=num_layers)
        params = abstract_params(m, mesh, rules, run)
        ids = _sds((B, T), jnp.int32, batch(2))
        if not costing:
            return Variant(sampling.prefill.lower(params, ids, ids, cfg=m, cache_len=S, run=run,
                                                  mesh=mesh, rules=rules), params)
        # prefill builds its own cache (of no layers at depth 0, which cannot be traced):
        # costed as extend, the same forward into a given empty cache
        cache = _abstract_cache(m.replace(num_layers=max(1, num_layers)), run, B, S, mesh, rules)
        lowered = sampling.extend.lower(params, cache, ids, ids, _sds((B,), jnp.int32, batch(1)),
                                        _sds((B, m.vocab_size), jnp.float32, batch(2)), cfg=m,
                                        run=run)
        return Variant(lowered, params, cache=cache)

    def decode_step(num_layers: int, costing: bool) -> Variant:
        m = cfg.replace(num_layers=num_layers)
        params = abstract_params(m, mesh, rules, run)
        cache = _abstract_cache(m.replace(num_layers=max(1, num_layers)), run, B, S, mesh, rules)
        if costing:  # one step without the decode loop, whose length XLA cannot time
            one = _sds((B, 1), jnp.int32, batch(2))
            lowered = sampling.extend.lower(
                params, cache, one, one, _sds((B,), jnp.int32, batch(1)),
                _sds((B, m.vocab_size), jnp.float32, batch(2)), cfg=m, run=run)
            return Variant(lowered, params, cache=cache)
        args = (params, cache, _sds((B, m.vocab_size), jnp.float32, batch(2)),
                _sds((B,), jnp.int32, batch(1)), _sds((B,), jnp.bool_, batch(1)),
                _sds((B, decode["max_new"]), jnp.int32, batch(2)), _sds((), jnp.int32, repl),
                _sds((B, 2), jnp.uint32, batch(2)),
                _sds((max(1, len(m.eos_token_ids)),), jnp.int32, repl),
                _sds((), jnp.int32, repl))
        lowered = sampling.decode_chunk.lower(
            *args, cfg=m, n_steps=decode["n_steps"], temperature=decode["temperature"],
            top_p=decode["top_p"], top_k=decode["top_k"], run=run)
        return Variant(lowered, params, cache=cache)

    n_flops = lambda tok, keys, rows: _inference_flops(cfg, tok, keys, rows)  # noqa: E731
    return [
        Stage("prefill", cfg, mesh, prefill, tokens=B * T, model_flops=n_flops(B * T, S, B * T),
              executed_flops=lambda L: _inference_flops(cfg.replace(num_layers=L), B * T, S,
                                                        B * T), notes=list(notes), run=run),
        Stage("decode", cfg, mesh, decode_step, tokens=B, model_flops=n_flops(B, S, B), run=run,
              executed_flops=lambda L: _inference_flops(cfg.replace(num_layers=L), B, S, B),
              notes=list(notes) + [
                  "one decode step (one token per row) over a full cache of S slots; the KV "
                  "cache is sharded by the logical rules (batch over data x fsdp, KV heads over "
                  "tensor)"]),
    ]


def _one_chip_or(mesh_shape: Optional[dict], devices, what: str):
    """The mesh of ``mesh_shape`` over ``devices``, or one chip when it is None (unsharded)."""
    if mesh_shape is None:
        return make_mesh({"data": 1}, list(devices)[:1], what)
    return make_mesh(mesh_shape, devices, what)


def teacher_stages(config, devices, mesh_shape: Optional[dict], prompt_len: int) -> List[Stage]:
    """Prefill and decode of a teacher config (``configs/teacher_*.py``) for prompts of
    ``prompt_len`` tokens."""
    cfg = model_config(str(config.teacher.model))
    # the weights in the compute dtype, as the trace generator loads them
    run = RunConfig(dtype=str(config.teacher.dtype), param_dtype=str(config.teacher.dtype))
    if mesh_shape is None:  # the config's own teacher.mesh, as the trace generator uses it
        try:
            mesh_shape = shd.parse_mesh_shape(config.teacher.get("mesh"))
        except ValueError as e:
            raise PreflightError(f"teacher.mesh: {e}") from None
    d = config.decode
    if d.mode == "two_phase":
        max_new = int(d.max_reasoning_tokens) + int(d.max_answer_tokens)
    else:
        max_new = int(d.max_new_tokens)
    bucket = int(config.length_bucket)
    T = round_up(prompt_len, bucket)
    S = int(config.cache_len) or T + round_up(max_new, bucket)
    mesh = _one_chip_or(mesh_shape, devices, "--mesh")
    notes = [f"{int(config.batch_size)} prompts of {T} tokens, a cache of {S} slots"]
    if mesh_shape is None:
        notes.append("unsharded, one chip per process, as the trace generator loads a teacher "
                     "without teacher.mesh; --mesh=... shows a sharded layout")
    decode = dict(n_steps=int(d.chunk), temperature=float(d.temperature), top_p=float(d.top_p),
                  top_k=int(d.top_k), max_new=max_new)
    return sampler_stages(cfg, run, mesh, shd.DEFAULT_RULES, int(config.batch_size), T, S,
                          decode, notes)


def score_stage(cfg: ModelConfig, run: RunConfig, mesh, rules, rows: int, T: int) -> Stage:
    """The BBQ log-likelihood forward over ``rows`` packed rows of ``T`` tokens, the LM head on
    :data:`SCORED_PER_ROW` positions per row (``eval.loglik``'s packed block)."""
    batch = shd.batch_sharding(mesh, rules)
    M = SCORED_PER_ROW

    def build(num_layers: int, costing: bool) -> Variant:
        m = cfg.replace(num_layers=num_layers)

        def forward(params, ids, seg, pos, pred_idx, pred_tgt, pred_mask):
            h = Decoder(m, run).apply({"params": params}, ids, positions=pos, segment_ids=seg,
                                      return_hidden=True)
            logits = lm_head(params, m, jnp.take_along_axis(h, pred_idx[..., None], axis=1),
                             run)
            lse = jax.nn.logsumexp(logits, axis=-1)
            tl = jnp.take_along_axis(logits, pred_tgt[..., None], axis=-1)[..., 0]
            hit = (jnp.argmax(logits, axis=-1) == pred_tgt) | ~pred_mask
            return jnp.where(pred_mask, tl - lse, 0.0), hit

        params = abstract_params(m, mesh, rules, run)
        ints = [_sds((rows, T), jnp.int32, batch) for _ in range(3)]
        preds = [_sds((rows, M), jnp.int32, batch), _sds((rows, M), jnp.int32, batch),
                 _sds((rows, M), jnp.bool_, batch)]
        with trace_context(mesh, run, rules, pin_activations=False):  # as the scorer traces it
            return Variant(jax.jit(forward).lower(params, *ints, *preds), params)

    flops = lambda L: _inference_flops(  # noqa: E731
        cfg.replace(num_layers=L), rows * T, _attention_keys(run, T), rows * M)
    kernel = rows * T * _attention_flops(cfg, run, T) if run.attention_impl == "splash" else 0.0
    return Stage("score", cfg, mesh, build, tokens=rows * T, model_flops=flops(cfg.num_layers),
                 executed_flops=flops, layer_depth=2, run=run, kernel_layer_flops=kernel,
                 notes=[f"{rows} packed rows of {T} tokens, {M} scored positions per row "
                        f"(assumed)"])


def eval_stages(config, devices, mesh_shape: Optional[dict], model: str,
                prompt_len: int) -> List[Stage]:
    """The programs of an evaluation config (``configs/eval.py``): the log-likelihood forward, or
    the sampler for ``mode=generate``."""
    name = model or config.model
    if not name:
        raise PreflightError("the eval config names no model: pass --model=PRESET (or "
                             "--config.model=...)")
    cfg = model_config(str(name))
    run = RunConfig(dtype=str(config.runtime.dtype or "float32"))
    if mesh_shape is None:
        mesh_shape = parse_mesh(config.runtime.mesh)
    mesh = _one_chip_or(mesh_shape, devices, "runtime.mesh / --mesh")
    # as the evaluator does: rows rounded up to the batch shards (filler rows are padding)
    rows = round_up(int(config.runtime.batch_size), shd.batch_shards(mesh))
    if config.mode == "generate":
        max_new = int(config.generate.max_new_tokens or 512)
        T = round_up(prompt_len, 64)
        decode = dict(n_steps=32, temperature=float(config.generate.temperature),
                      top_p=float(config.generate.top_p), top_k=int(config.generate.top_k),
                      max_new=max_new)
        return sampler_stages(cfg, run, mesh, shd.DEFAULT_RULES, rows, T,
                              T + round_up(max_new, 64), decode, [f"{rows} prompts of {T} tokens"])
    if config.mode != "loglik":
        raise PreflightError(f"eval mode {config.mode!r}: the preflight builds loglik and "
                             f"generate")
    return [score_stage(cfg, run, mesh, shd.DEFAULT_RULES, rows, int(config.loglik.seq_len))]
