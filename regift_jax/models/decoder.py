"""One Flax (Linen) decoder for Llama-3.x, Mistral, Qwen2 and Phi-3/Phi-4.

The families differ only by :class:`~regift_jax.models.config.ModelConfig` flags:

* Llama-3.x: GQA, RoPE with optional ``llama3`` frequency scaling, RMSNorm, SwiGLU, tied or
  untied embeddings.
* Mistral-7B-v0.1: ``sliding_window`` (a query attends to keys with ``q_pos - k_pos < window``,
  the transformers convention).
* Qwen2: ``attention_bias`` (q/k/v biases).
* Phi-3/Phi-4: identical compute; the checkpoint stores ``qkv_proj`` and ``gate_up_proj`` fused,
  which :mod:`regift_jax.models.checkpoints` splits on import and fuses on export.

Layers are stacked with ``nn.scan`` (leading ``layers`` axis on every block parameter), which keeps
compile time flat in depth, and can be rematerialised with a named policy (``remat_policy``).

``Decoder(cfg, run, lora)``: ``cfg`` the architecture (:class:`ModelConfig`), ``run`` how it is
computed (:class:`~regift_jax.models.run_config.RunConfig`: dtypes, remat, attention kernel and
chunk), ``lora`` the adapters (:class:`~regift_jax.models.run_config.LoraConfig`, rank 0 = none).

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``layers``, ``lora``) through ``nn.with_logical_partitioning``;
:mod:`regift_jax.core.sharding` maps them to mesh axes with one rules table.

Attention masks are built from ``positions`` and ``segment_ids`` only: a query attends to a key iff
both have the same non-zero segment id and ``k_pos <= q_pos`` (and inside the sliding window).
This one rule covers left-padded batches (padding has segment 0), packed rows (one segment per
example, positions restarting at 0) and the KV cache (cached keys keep their position/segment).

The KV cache is an explicit pytree ``{"k": [L, B, KV, hd, S], "v": [L, B, KV, S, hd], "pos",
"seg": [B, S], "index": int32[]}`` (keys stored transposed so attention needs no transposes of
the cache); ``__call__(..., cache=c)`` writes the new keys at ``c["index"]`` and returns
``(logits, new_cache)``.  The stacked cache travels through the layer scan as carry and each
layer writes only its new slots in place.  Prefill and per-token decode are the same function.

Without a cache, ``attention_impl`` picks the attention kernel: the decoder's own ``einsum``
(default; :func:`_attend`, optionally in causal query chunks), ``jax.nn.dot_product_attention``
with implementation ``xla`` or ``cudnn`` (GPU flash attention), given the boolean
:func:`dpa_mask`, or only ``is_causal`` when the call has no positions and segment ids, or
``splash``, the Pallas TPU kernel of :mod:`regift_jax.models.splash` given the segment ids.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from regift_jax.core import sharding as shd
from regift_jax.models import splash
from regift_jax.models.config import ModelConfig
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig

# Logical axes of the activations (core.sharding's rules table), pinned by shd.constrain while a
# program is traced in trace_context.
ACT = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "mlp")
ACT_VOCAB = ("batch", "length", "vocab")

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def to_dtype(name) -> Any:
    if not isinstance(name, str):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}") from None


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64 host math, like transformers' fp32 path)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type")
    if kind == "linear":
        return (inv / np.float32(rs["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = rs["factor"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling {rs!r}")


def rope_cos_sin(positions: Array, inv_freq: np.ndarray):
    """cos/sin [B, T, head_dim] in float32 (transformers' rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, N, hd]; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rot * sin[:, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- masks
def attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window: Optional[int]) -> Array:
    """Boolean [B, 1, 1, T, S] mask (broadcast over kv heads and group)."""
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    m &= k_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        m &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return m[:, None, None, :, :]


def dpa_mask(positions, segment_ids, sliding_window: Optional[int]) -> Array:
    """Boolean [B, 1, T, T] mask for ``jax.nn.dot_product_attention`` (no KV cache): the
    :func:`attention_mask` rule, plus each padding query (segment 0) attending to itself, so no
    row is fully masked (cuDNN may return NaN for an empty row; a padding row's output is never
    used).  Rows are in causal order within a segment, so ``is_causal=True`` removes nothing."""
    m = attention_mask(positions, segment_ids, positions, segment_ids, sliding_window)[:, 0]
    T = positions.shape[1]
    pad_self = (segment_ids == 0)[:, :, None] & jnp.eye(T, dtype=jnp.bool_)[None]
    return m | pad_self[:, None]


def mask_bias(q_pos, q_seg, k_pos, k_seg, sliding_window: Optional[int]) -> Array:
    """float32 [B, 1, 1, T, S]: 0 where :func:`attention_mask` allows, finfo.min elsewhere
    (a fully masked row, e.g. a padding query, gets uniform weights, as with ``where``)."""
    m = attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window)
    return jnp.where(m, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def cache_free_mask(cfg: ModelConfig, run: RunConfig, positions, segment_ids,
                    plain_causal: bool):
    """The mask of a call without a KV cache, in the form ``run.attention_impl`` takes: the
    additive :func:`mask_bias` (einsum), the boolean :func:`dpa_mask` or None for plain causal
    rows (xla, cudnn), the segment ids (splash: the kernel builds the causal and window masks)."""
    if run.attention_impl == "splash":
        return segment_ids
    if run.attention_impl != "einsum":
        return (None if plain_causal and cfg.sliding_window is None
                else dpa_mask(positions, segment_ids, cfg.sliding_window))
    return mask_bias(positions, segment_ids, positions, segment_ids, cfg.sliding_window)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale.astype(self.dtype))


def lora_a_init(n_in: int, stacked: bool = False):
    """PEFT's default initialiser of LoRA's A (``init_lora_weights=True``:
    ``kaiming_uniform_(a=sqrt(5))`` on torch's ``[r, in]`` weight), i.e. U(-b, b) with
    b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).  ``fan_in`` is the product of the
    ``n_in`` input axes, which follow a leading ``layers`` axis when ``stacked``."""
    first = 1 if stacked else 0
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(first, first + n_in)), out_axis=-1,
        batch_axis=(0,) if stacked else ())


class Proj(nn.Module):
    """A linear map contracting the last ``len(in_shape)`` axes, with optional bias and LoRA.

    kernel: in_shape + out_shape.  LoRA (when ``lora_rank > 0``): ``lora_a`` in_shape + (r,)
    (:func:`lora_a_init`, PEFT's), ``lora_b`` (r,) + out_shape (zeros), scaled by alpha / r; the
    LoRA branch sees the input through dropout (rate ``lora_dropout``) in training.
    """
    in_shape: tuple
    out_shape: tuple
    in_axes: tuple
    out_axes: tuple
    use_bias: bool = False
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        n_in = len(self.in_shape)
        fan_in = int(np.prod(self.in_shape))
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in)),
                self.in_axes + self.out_axes),
            self.in_shape + self.out_shape, self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        xd = x.astype(self.dtype)
        y = jax.lax.dot_general(xd, kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.out_axes),
                              self.out_shape, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora_rank > 0:
            a = self.param("lora_a", nn.with_logical_partitioning(
                lora_a_init(n_in), self.in_axes + ("lora",)),
                self.in_shape + (self.lora_rank,), self.param_dtype)
            b = self.param("lora_b", nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora",) + self.out_axes),
                (self.lora_rank,) + self.out_shape, self.param_dtype)
            xl = nn.Dropout(self.lora_dropout)(xd, deterministic=deterministic)
            h = jax.lax.dot_general(xl, a.astype(self.dtype), (contract, ((), ())))
            h = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
            y = y + h * (self.lora_alpha / self.lora_rank)
        return y


# The seven projections of a block: name -> (parent module, logical input axes, logical output
# axes).  The decoder builds its layers from this table, LoRA adds adapters by it and the
# checkpoint key map names HF tensors by it, so a kernel's layout has one definition.
PROJECTIONS = {
    "q_proj": ("self_attn", ("embed",), ("heads", "head_dim")),
    "k_proj": ("self_attn", ("embed",), ("kv_heads", "head_dim")),
    "v_proj": ("self_attn", ("embed",), ("kv_heads", "head_dim")),
    "o_proj": ("self_attn", ("heads", "head_dim"), ("embed",)),
    "gate_proj": ("mlp", ("embed",), ("mlp",)),
    "up_proj": ("mlp", ("embed",), ("mlp",)),
    "down_proj": ("mlp", ("mlp",), ("embed",)),
}


def proj_shapes(cfg: ModelConfig, name: str) -> Tuple[tuple, tuple]:
    """``(in_shape, out_shape)`` of projection ``name``'s kernel in one layer."""
    size = {"embed": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size}
    _, in_axes, out_axes = PROJECTIONS[name]
    return tuple(size[a] for a in in_axes), tuple(size[a] for a in out_axes)


def _proj(cfg: ModelConfig, run: RunConfig, lora: LoraConfig, name: str,
          use_bias: bool = False) -> Proj:
    """Projection ``name`` of a block, with a LoRA adapter when it is one of ``lora.targets``."""
    _, in_axes, out_axes = PROJECTIONS[name]
    in_shape, out_shape = proj_shapes(cfg, name)
    kw = {}
    if lora.applies_to(name):
        kw = dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    return Proj(in_shape, out_shape, in_axes, out_axes, use_bias=use_bias, name=name,
                param_dtype=to_dtype(run.param_dtype), dtype=to_dtype(run.dtype), **kw)


def _attend(q, k_t, v_t, mask, dt):
    """Softmax attention.  q [B, T, H, hd]; keys k_t [B, KV, hd, S]; values v_t [B, KV, S, hd];
    ``mask`` [B, 1, 1, T, S]: boolean (True = attend) or a float32 additive bias (0 / finfo.min,
    :func:`mask_bias`).  Returns [B, T, H, hd].  Layouts chosen so both products are plain batched
    matmuls over (b, kv).

    Without a KV cache (training, scoring) the decoder passes the additive bias: the VJP of an add
    needs no copy of the broadcast mask, which autodiff through the layer scan would otherwise save
    per layer.  With a cache it passes the boolean mask: with the bias, XLA copies the whole
    stacked cache per layer in a decode step."""
    B, T, H, hd = q.shape
    KV, S = k_t.shape[1], k_t.shape[-1]
    G = H // KV
    qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
    scores = jnp.einsum("bkqh,bkhs->bkqs", qg, k_t,
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = scores.reshape(B, KV, G, T, S)
    if mask.dtype == jnp.bool_:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    else:
        scores = scores + mask
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(B, KV, G * T, S)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v_t)
    return out.reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


class Attention(nn.Module):
    cfg: ModelConfig
    run: RunConfig = RunConfig()
    lora: LoraConfig = NO_LORA

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, deterministic):
        cfg, run = self.cfg, self.run
        dt = to_dtype(run.dtype)
        q = _proj(cfg, run, self.lora, "q_proj", cfg.attention_bias)(x, deterministic)
        k = _proj(cfg, run, self.lora, "k_proj", cfg.attention_bias)(x, deterministic)
        v = _proj(cfg, run, self.lora, "v_proj", cfg.attention_bias)(x, deterministic)
        q = shd.constrain(apply_rope(q, cos, sin), ACT_HEADS)
        k = shd.constrain(apply_rope(k, cos, sin), ACT_KV_HEADS)
        v = shd.constrain(v, ACT_KV_HEADS)
        T = q.shape[1]
        # Attention layouts chosen so both products are plain batched matmuls over (b, kv):
        # keys as [B, KV, hd, S] (q @ K), values as [B, KV, S, hd] (p @ V); the cache stores them
        # that way, so a decode step never transposes the cache.
        k_t = k.transpose(0, 2, 3, 1)  # [B, KV, hd, T]
        v_t = v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
        new_cache = None
        if layer_cache is not None:
            ck, cv, li = layer_cache  # whole stacked cache + this layer's index (scan carry)
            ck = jax.lax.dynamic_update_slice(ck, k_t[None].astype(ck.dtype),
                                              (li, 0, 0, 0, cache_index))
            cv = jax.lax.dynamic_update_slice(cv, v_t[None].astype(cv.dtype),
                                              (li, 0, 0, cache_index, 0))
            new_cache = (ck, cv, li)
            k_t = jax.lax.dynamic_index_in_dim(ck, li, 0, keepdims=False).astype(dt)
            v_t = jax.lax.dynamic_index_in_dim(cv, li, 0, keepdims=False).astype(dt)
        chunk = run.attention_chunk
        if layer_cache is None and run.attention_impl == "splash":
            # Pallas TPU kernel; ``mask`` is the segment ids (it builds causal/window masks)
            out = splash.splash_attention(q, k, v, mask, cfg.sliding_window)
        elif layer_cache is None and run.attention_impl != "einsum":
            # jax.nn.dot_product_attention in the [B, T, N, hd] layout; ``mask`` is the boolean
            # [B, 1, T, T] mask of :func:`dpa_mask` (padding queries attend to themselves, so no
            # row is empty), or None for unpadded, unpacked causal rows (``is_causal`` only: the
            # form cuDNN's flash kernel runs without reading a bias).
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=run.attention_impl)
        elif layer_cache is None and chunk and T > chunk:
            # Causal query chunks (no cache): positions increase along a row within a segment
            # (left padding, packing), so a key after the query in the row is always masked and
            # query chunk [q0, q1) only needs keys [0, q1): skips ~half the scores and their
            # float32 temporaries.  Same values as the unchunked path (tests/test_decoder.py).
            outs = [_attend(q[:, q0:q0 + chunk], k_t[..., :q0 + chunk], v_t[:, :, :q0 + chunk],
                            mask[..., q0:q0 + chunk, :q0 + chunk], dt)
                    for q0 in range(0, T, chunk)]
            out = jnp.concatenate(outs, axis=1)
        else:
            out = _attend(q, k_t, v_t, mask, dt)
        out = shd.constrain(out, ACT_HEADS)
        y = _proj(cfg, run, self.lora, "o_proj")(out, deterministic)
        return shd.constrain(y, ACT), new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    run: RunConfig = RunConfig()
    lora: LoraConfig = NO_LORA

    @nn.compact
    def __call__(self, x, deterministic):
        cfg, run, lora = self.cfg, self.run, self.lora
        g = shd.constrain(_proj(cfg, run, lora, "gate_proj")(x, deterministic), ACT_MLP)
        u = shd.constrain(_proj(cfg, run, lora, "up_proj")(x, deterministic), ACT_MLP)
        y = _proj(cfg, run, lora, "down_proj")(nn.silu(g) * u, deterministic)
        return shd.constrain(y, ACT)


class Block(nn.Module):
    cfg: ModelConfig
    run: RunConfig = RunConfig()
    lora: LoraConfig = NO_LORA
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_index):
        x, layer_cache = carry
        x = shd.constrain(x, ACT)
        cfg, run, lora = self.cfg, self.run, self.lora
        pd, dt = to_dtype(run.param_dtype), to_dtype(run.dtype)
        h = RMSNorm(cfg.rms_norm_eps, pd, dt, name="input_layernorm")(x)
        a, new_cache = Attention(cfg, run, lora, name="self_attn")(
            h, cos, sin, mask, layer_cache, cache_index, self.deterministic)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, pd, dt, name="post_attention_layernorm")(x)
        x = shd.constrain(x + MLP(cfg, run, lora, name="mlp")(h, self.deterministic), ACT)
        if new_cache is not None:
            new_cache = (new_cache[0], new_cache[1], new_cache[2] + 1)
        return (x, new_cache), None


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots": "checkpoint_dots",
    "dots_with_no_batch_dims": "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable": "nothing_saveable",
}


def trace_context(mesh, run: RunConfig, rules=shd.DEFAULT_RULES, pin_activations: bool = True):
    """The context to trace (jit, lower) a decoder call in: activations laid out over ``mesh``
    by ``rules`` (:func:`regift_jax.core.sharding.activation_sharding`; ``pin_activations=False``
    leaves them to XLA) and, for the splash kernel of a cache-free call, ``jax.set_mesh(mesh)``
    so it runs in ``shard_map``.

    The train step pins them; the log-likelihood scorer does not, as for its few rows per chip
    the TPU preflight estimated XLA's own layout faster (BENCHMARKS.md "TPU by compilation")."""
    stack = contextlib.ExitStack()
    stack.enter_context(shd.activation_sharding(mesh if pin_activations else None, rules))
    if mesh is not None and run.attention_impl == "splash":
        stack.enter_context(jax.set_mesh(mesh))
    return stack


def remat_policy(name: str):
    if name not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; valid: none, "
                         f"{', '.join(_REMAT_POLICIES)}")
    p = _REMAT_POLICIES[name]
    return None if p is None else getattr(jax.checkpoint_policies, p)


class Decoder(nn.Module):
    """The decoder.  ``__call__(input_ids, positions=None, segment_ids=None, cache=None,
    deterministic=True, return_hidden=False)``.

    * ``input_ids`` int32 [B, T].
    * ``positions`` int32 [B, T] (default ``arange(T)``), drives RoPE and causality.
    * ``segment_ids`` int32 [B, T] (default ones); 0 marks padding.
    * ``cache``: see module docstring.  With a cache the result is ``(logits, new_cache)``.

    Returns float32 logits [B, T, V] (or hidden states [B, T, D] if ``return_hidden``).
    ``run`` and ``lora`` default to float32 without adapters.
    """
    cfg: ModelConfig
    run: RunConfig = RunConfig()
    lora: LoraConfig = NO_LORA

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, cache=None,
                 deterministic: bool = True, return_hidden: bool = False):
        cfg, run = self.cfg, self.run
        pd, dt = to_dtype(run.param_dtype), to_dtype(run.dtype)
        embed = self.param(
            "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                         ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), pd)
        block = Block
        if run.remat_policy != "none":
            block = nn.remat(Block, policy=remat_policy(run.remat_policy), prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, run, self.lora, deterministic, name="layers")
        B, T = input_ids.shape
        plain_causal = positions is None and segment_ids is None  # one sequence per row
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        x = shd.constrain(jnp.take(embed, input_ids, axis=0).astype(dt), ACT)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
        if cache is None:
            mask = cache_free_mask(cfg, run, positions, segment_ids, plain_causal)
            kv, idx = None, jnp.zeros((), jnp.int32)
        else:
            idx = cache["index"]
            k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, idx))
            k_seg = jax.lax.dynamic_update_slice(cache["seg"], segment_ids, (0, idx))
            mask = attention_mask(positions, segment_ids, k_pos, k_seg, cfg.sliding_window)
            kv = (cache["k"], cache["v"], jnp.zeros((), jnp.int32))
        (x, new_kv), _ = layers((x, kv), cos, sin, mask, idx)
        x = shd.constrain(RMSNorm(cfg.rms_norm_eps, pd, dt, name="norm")(x), ACT)
        if return_hidden:
            out = x
        else:
            if cfg.tie_word_embeddings:
                w = embed
            else:
                w = self.param("lm_head", nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.02), ("embed", "vocab")),
                    (cfg.hidden_size, cfg.vocab_size), pd)
            out = shd.constrain(head_logits(x, w, cfg.tie_word_embeddings, run.dtype), ACT_VOCAB)
        if cache is None:
            return out
        new_cache = {"k": new_kv[0], "v": new_kv[1], "pos": k_pos, "seg": k_seg,
                     "index": idx + T}
        return out, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype="float32") -> dict:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens, in the compute
    ``dtype`` (``RunConfig.dtype``)."""
    dt = to_dtype(dtype)
    L, KV, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return {"k": jnp.zeros((L, batch, KV, hd, max_len), dt),
            "v": jnp.zeros((L, batch, KV, max_len, hd), dt),
            "pos": jnp.zeros((batch, max_len), jnp.int32),
            "seg": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def positions_from_mask(attention_mask: Array) -> Array:
    """Left-padded batch: position = number of real tokens before (0 on padding)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


def init_params(cfg: ModelConfig, rng=None, boxed: bool = False, run: RunConfig = RunConfig(),
                lora: LoraConfig = NO_LORA):
    """Random parameters (tiny test configs, benchmarks) in ``run.param_dtype``, with ``lora``'s
    adapters.  ``boxed`` keeps the ``nn.LogicallyPartitioned`` metadata."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    model = Decoder(cfg, run, lora)
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = model.init(rng, ids)
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def param_shardings(cfg: ModelConfig, mesh, rules=shd.DEFAULT_RULES, run: RunConfig = RunConfig(),
                    lora: LoraConfig = NO_LORA):
    """NamedSharding pytree for the decoder's params (abstract init: no memory, no FLOPs)."""
    abstract = jax.eval_shape(lambda: Decoder(cfg, run, lora).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 2), jnp.int32)))["params"]
    return shd.tree_shardings(abstract, mesh, rules)


def head_weight(params, cfg: ModelConfig):
    """The LM head's weight and whether it is vocab-major: the token embedding ``[V, D]`` when
    tied, else ``lm_head`` ``[D, V]``."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"], True
    return params["lm_head"], False


def head_logits(h, w, vocab_major: bool, dtype: str):
    """float32 logits ``[..., V]`` from hidden states ``h [..., D]`` (the one LM-head matmul)."""
    dt = to_dtype(dtype)
    eq = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    return jnp.einsum(eq, h.astype(dt), w.astype(dt),
                      preferred_element_type=jnp.float32).astype(jnp.float32)


def lm_head(params, cfg: ModelConfig, h, run: RunConfig = RunConfig()):
    """Logits (float32) from final hidden states ``h [..., D]``, as :class:`Decoder` computes."""
    w, vocab_major = head_weight(params, cfg)
    return head_logits(h, w, vocab_major, run.dtype)
