"""LoRA for the decoder: add adapters to a loaded model, mark them trainable, merge them back.

The decoder's :class:`~regift_jax.models.decoder.Proj` layers hold ``lora_a`` (in -> r) and
``lora_b`` (r -> out) next to ``kernel`` when the decoder's :class:`LoraConfig` has ``rank > 0``
and the projection is in its ``targets``; the forward adds ``dropout(x) @ a @ b * alpha / r``.
The LoRA settings are their own config, next to the architecture (``ModelConfig``) and the way it
is run (``RunConfig``): an adapted model is ``Decoder(cfg, run, lora)`` over the adapted params.  Initialised as PEFT's
default (which the paper used): ``lora_a`` kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
and ``lora_b`` zero, so a freshly adapted model computes exactly the base model (tested).

The trainer keeps base weights frozen by building its optimizer over the LoRA leaves only
(:func:`lora_mask` / :func:`split`), so they are not in the optimizer state.
"""

from __future__ import annotations

import zlib
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from regift_jax.core import sharding as shd
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import PROJECTIONS, lora_a_init
from regift_jax.models.run_config import LoraConfig

__all__ = ["LoraConfig", "add_lora", "merge_lora", "lora_mask", "split", "combine",
           "is_lora_path"]


def _check(lora: LoraConfig):
    bad = [t for t in lora.targets if t not in PROJECTIONS]
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid: {sorted(PROJECTIONS)}")
    if lora.rank <= 0:
        raise ValueError("lora_rank must be > 0 to add LoRA adapters")


def add_lora(cfg: ModelConfig, lora: LoraConfig, params: dict, seed: int = 0, mesh=None,
             rules=None) -> dict:
    """``params`` with fresh LoRA leaves for ``lora.targets`` (run them as
    ``Decoder(cfg, run, lora)``).

    ``lora_a`` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform, deterministic per
    target from ``seed``), ``lora_b`` = 0.
    """
    _check(lora)
    r = lora.rank
    layers = dict(params["layers"])
    for name in lora.targets:
        parent, in_axes, out_axes = PROJECTIONS[name]
        mod = dict(layers[parent])
        leaf = dict(mod[name])
        k = leaf["kernel"]
        L, n_in = k.shape[0], len(in_axes)
        in_shape, out_shape = k.shape[1:1 + n_in], k.shape[1 + n_in:]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))
        a = lora_a_init(n_in, stacked=True)(key, (L,) + in_shape + (r,), jnp.float32)
        b = jnp.zeros((L, r) + out_shape, jnp.float32)
        pd = k.dtype
        a, b = a.astype(pd), b.astype(pd)
        if mesh is not None:
            rl = rules or shd.DEFAULT_RULES
            a = jax.device_put(a, NamedSharding(mesh, shd.logical_to_spec(
                ("layers",) + in_axes + ("lora",), a.shape, mesh, rl)))
            b = jax.device_put(b, NamedSharding(mesh, shd.logical_to_spec(
                ("layers", "lora") + out_axes, b.shape, mesh, rl)))
        leaf["lora_a"], leaf["lora_b"] = a, b
        mod[name] = leaf
        layers[parent] = mod
    out = dict(params)
    out["layers"] = layers
    return out


def is_lora_path(path) -> bool:
    last = path[-1]
    key = getattr(last, "key", getattr(last, "name", last))
    return key in ("lora_a", "lora_b")


def lora_mask(params):
    """Pytree of bools: True on LoRA leaves."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(p), params)


def split(params):
    """(trainable LoRA leaves, frozen base leaves) as two dicts with the same nesting."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    lora, base = {}, {}
    for path, v in flat:
        keys = tuple(getattr(k, "key", k) for k in path)
        tgt = lora if is_lora_path(path) else base
        d = tgt
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = v
    return lora, base


def combine(a: dict, b: dict) -> dict:
    """Deep-merge two disjoint nested dicts (inverse of :func:`split`)."""
    out = dict(b)
    for k, v in a.items():
        out[k] = combine(v, out.get(k, {})) if isinstance(v, dict) else v
    return out


def merge_lora(lora: LoraConfig, params: dict) -> dict:
    """Fold every adapter into its kernel: W + a @ b * alpha / r; drop the LoRA leaves (the result
    runs without ``lora``)."""
    scale = lora.alpha / lora.rank if lora.rank else 0.0
    layers = dict(params["layers"])
    for name, (parent, _, _) in PROJECTIONS.items():
        mod = dict(layers[parent])
        leaf = dict(mod[name])
        if "lora_a" not in leaf:
            continue
        a, b, k = leaf.pop("lora_a"), leaf.pop("lora_b"), leaf["kernel"]
        L, r = a.shape[0], a.shape[-1]
        a2 = a.astype(jnp.float32).reshape(L, -1, r)
        b2 = b.astype(jnp.float32).reshape(L, r, -1)
        delta = jnp.einsum("lir,lro->lio", a2, b2).reshape(k.shape) * scale
        leaf["kernel"] = (k.astype(jnp.float32) + delta).astype(k.dtype)
        mod[name] = leaf
        layers[parent] = mod
    out = dict(params)
    out["layers"] = layers
    return out
