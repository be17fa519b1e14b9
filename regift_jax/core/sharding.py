"""Device mesh and the one logical-axis rules table.

Parameters and activations are annotated with *logical* axis names by the model
(:mod:`regift_jax.models.decoder`); this module maps them to the physical mesh axes
``("data", "fsdp", "tensor")`` through ``rules`` (MaxText / Flax ``MeshRules`` style):

=========  ===================  =====================================================
logical    mesh axes (default)   meaning
=========  ===================  =====================================================
batch      (data, fsdp)          examples of a global batch
length     -                     sequence
vocab      tensor                vocabulary (embedding rows, lm_head columns)
embed      fsdp                  model width: parameters are ZeRO-3 sharded over fsdp
act_embed  -                     model width of activations (whole on every chip of a row)
heads      tensor                query heads
kv_heads   tensor                key/value heads
head_dim   -
mlp        tensor                feed-forward width
layers     -                     the scanned layer axis
lora       -                     LoRA rank
=========  ===================  =====================================================

A mesh axis is dropped from a dimension's spec when it does not divide that dimension (e.g.
SmolLM2's 3 KV heads on a tensor axis of 2): the dimension is replicated over that axis instead of
failing, and :func:`tree_shardings` (``models.decoder.param_shardings`` for the decoder) reports
every such fallback.  Mesh sizes may be ``-1`` (fill with the remaining devices).

Activations are pinned by the same table while a program is traced inside
:func:`activation_sharding` (the decoder calls :func:`constrain` on its hidden states, attention
heads and MLP features): without it XLA's propagation meets FSDP-sharded weights and
batch-sharded inputs and may keep the weights sharded, all-reducing whole activations instead of
all-gathering the weights (the TPU preflight showed ``bf16[16,1024,14336]`` all-reduces in every
Llama-3.1-8B layer).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Tuple[Tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora", None),
)

log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Dict[str, int], n_devices: int) -> Dict[str, int]:
    """Fill a single ``-1`` entry so the product equals ``n_devices``; validate."""
    shape = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, v in shape.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    known = math.prod(v for v in shape.values() if v != -1)
    if unknown:
        if n_devices % known:
            fixed = ",".join(f"{a}={v}" for a, v in shape.items() if v not in (1, -1))
            raise ValueError(f"mesh {shape}: {n_devices} devices not divisible by {known} "
                             f"(the product of {fixed} must divide {n_devices})")
        shape[unknown[0]] = n_devices // known
    if math.prod(shape.values()) != n_devices:
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, "
                         f"{n_devices} available")
    return shape


def make_mesh(shape: Optional[Dict[str, int]] = None, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


def parse_mesh_shape(spec: Optional[str]) -> Optional[Dict[str, int]]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}``; None or "" -> None (no mesh).
    Raises ValueError naming a bad entry."""
    if not spec:
        return None
    shape = {}
    for part in str(spec).split(","):
        name, _, val = part.partition("=")
        if name.strip() not in MESH_AXES or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r}: bad entry {part!r} (expected AXIS=N with AXIS in "
                             f"{', '.join(MESH_AXES)})")
        shape[name.strip()] = int(val)
    return shape


def parse_mesh(spec: Optional[str], devices: Optional[Sequence] = None) -> Optional[Mesh]:
    """The mesh a ``--mesh`` string (:func:`parse_mesh_shape`) describes over ``devices``
    (default: every device); None for no mesh (unsharded, one device)."""
    shape = parse_mesh_shape(spec)
    return None if shape is None else make_mesh(shape, devices)


def axis_names(axes) -> Tuple[str, ...]:
    """A spec entry (a mesh axis name, a tuple of them, or None) as a tuple of names."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axes_size(mesh: Mesh, axes) -> int:
    """The number of devices along ``axes`` (a mesh axis name, a tuple of them, or None)."""
    return math.prod(mesh.shape.get(a, 1) for a in axis_names(axes))


def logical_to_spec(logical: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                    mesh: Optional[Mesh] = None, rules=DEFAULT_RULES, fallbacks=None) -> P:
    """PartitionSpec for one array; mesh axes are used at most once per array."""
    table = dict(rules)
    used, out = set(), []
    for i, name in enumerate(logical):
        axes = table.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            # an axis the mesh lacks counts as size 1 (e.g. a kernel's mesh of other axes)
            tup = tuple(a for a in tup
                        if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
            if mesh is not None and shape is not None and tup and shape[i] % axes_size(mesh, tup):
                # Keep the largest dividing prefix, replicate over the rest.
                while tup and shape[i] % axes_size(mesh, tup):
                    tup = tup[:-1]
                if fallbacks is not None:
                    fallbacks.append((tuple(logical), i, shape[i], axes, tup))
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out)


def tree_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES, report: bool = True):
    """NamedShardings for a pytree whose leaves are ``nn.LogicallyPartitioned`` (or plain arrays,
    which are replicated)."""
    fallbacks = []

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            spec = logical_to_spec(x.names, x.value.shape, mesh, rules, fallbacks)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    out = jax.tree.map(one, abstract_boxed,
                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    if report and fallbacks:
        seen = sorted({(f[0], f[2], str(f[3])) for f in fallbacks})
        for names, size, axes in seen:
            log.warning("sharding: dim of size %d (%s) not divisible by mesh axes %s; "
                        "replicated instead", size, names, axes)
    return out


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    spec = logical_to_spec(("batch",) + ("length",) * (ndim - 1), None, mesh, rules)
    return NamedSharding(mesh, spec)


def batch_shards(mesh: Optional[Mesh], rules=DEFAULT_RULES) -> int:
    """How many ways :func:`batch_sharding` splits the batch dimension (1 without a mesh): a
    batch's row count must be a multiple of it."""
    if mesh is None:
        return 1
    return axes_size(mesh, batch_sharding(mesh, rules).spec[0])


_ACTIVATIONS = contextvars.ContextVar("regift_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh], rules=DEFAULT_RULES):
    """While a program is traced in this context, :func:`constrain` lays activations out over
    ``mesh`` by ``rules``; without a mesh (or on one device) it does nothing."""
    active = mesh is not None and mesh.size > 1
    token = _ACTIVATIONS.set((mesh, tuple(rules)) if active else None)
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def active_activation_sharding():
    """``(mesh, rules)`` while tracing inside :func:`activation_sharding` on several devices,
    else None."""
    return _ACTIVATIONS.get()


def constrain(x, logical: Sequence[Optional[str]]):
    """``x`` pinned to the sharding its logical axes map to (a mesh axis that does not divide a
    dimension is dropped, :func:`logical_to_spec`), inside :func:`activation_sharding`; else
    ``x`` unchanged."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(logical, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
