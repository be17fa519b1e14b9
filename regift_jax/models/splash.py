"""Pallas TPU splash attention: the decoder's attention without a KV cache (training, scoring) when
``RunConfig.attention_impl == "splash"``.

``jax.experimental.pallas.ops.tpu.splash_attention`` is a flash-attention kernel that skips whole
masked blocks.  Its masks here: index-causal (a key after the query in the row is never attended),
a local window ``q - k < sliding_window`` when the model has one, and equal segment ids of query
and key.  For every real token this is the decoder's rule
(:func:`regift_jax.models.decoder.attention_mask`): within a segment positions increase by one
along the row (left padding, packed rows), so index distance is position distance.  Padding
tokens (segment 0) attend to earlier padding, never to a real token, and their outputs are never
read; every row attends at least to itself, so no softmax is empty.

Shapes: the kernel's blocks are multiples of 128 tokens and the sequence a multiple of the block,
so the sequence is padded at the end with segment-0 tokens (after every real token, so never
attended by one) and the output cut back.  Any head dim compiles.  The query is scaled by
``1/sqrt(head_dim)`` before the kernel (the kernel does not scale).

Sharding: XLA cannot partition a Mosaic kernel, so when a mesh is set for the trace
(``jax.set_mesh``, which :func:`regift_jax.models.decoder.trace_context` does) the kernel runs
inside ``shard_map``: batch over the default rules' ``batch`` axes, heads over ``tensor`` when that
divides both the query and the KV heads (else heads are gathered).  With no mesh set the call is
unsharded, which is right on one device; a multi-device TPU program traced without
``jax.set_mesh`` fails in XLA with "Mosaic kernels cannot be automatically partitioned".  Off TPU
(CPU tests) the kernel runs in Pallas interpret mode; the target is the mesh's platform, else the
default backend.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from regift_jax.core import sharding as shd
from regift_jax.core.shapes import round_up

LANES = 128  # the kernel's block sizes are multiples of the TPU lane width
MAX_BLOCK = 512


def block_size(seq_len: int) -> int:
    """The kernel block for a sequence: the sequence rounded up to 128, at most 512."""
    return min(MAX_BLOCK, round_up(seq_len, LANES))


def _kernel(num_heads: int, seq_len: int, block: int, sliding_window: Optional[int],
            interpret: bool):
    """The kernel for one device's heads.  Built inside each trace: it holds its block-sparsity
    tables as arrays, which must not outlive the trace (the library caches the numpy work)."""
    shape = (seq_len, seq_len)
    mask = (sm.CausalMask(shape) if sliding_window is None
            else sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _on_tpu(mesh) -> bool:
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return platform == "tpu"


def _specs(mesh, batch: int, heads: int, kv_heads: int):
    """shard_map specs of ``[B, N, T, hd]`` and of segment ids ``[B, T]``."""
    b = shd.logical_to_spec(("batch",), (batch,), mesh)[0]
    t = mesh.shape.get("tensor", 1)
    h = "tensor" if t > 1 and heads % t == 0 and kv_heads % t == 0 else None
    return P(b, h, None, None), P(b, None)


def splash_attention(q, k, v, segment_ids, sliding_window: Optional[int] = None,
                     block: Optional[int] = None, interpret: Optional[bool] = None):
    """Causal attention of ``q [B, T, H, hd]`` over ``k, v [B, T, KV, hd]`` within segments
    (``segment_ids [B, T]``, 0 = padding); returns ``[B, T, H, hd]`` in ``q``'s dtype.

    ``block``: the kernel block (a multiple of 128; default :func:`block_size`).  ``interpret``:
    Pallas interpret mode (default: when the target is not a TPU)."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    block = block or block_size(T)
    if block % LANES:
        raise ValueError(f"splash attention block {block} is not a multiple of {LANES}")
    mesh = jax.sharding.get_abstract_mesh()
    interpret = not _on_tpu(mesh) if interpret is None else interpret
    Tp = round_up(T, block)

    def layout(x):  # [B, T, N, hd] -> [B, N, Tp, hd]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(hd))).astype(q.dtype)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)))
    args = (layout(q), layout(k), layout(v), seg)
    multi = not mesh.empty and math.prod(mesh.shape.values()) > 1
    qs, ss = _specs(mesh, B, H, KV) if multi else (P(None, None), P())
    local_heads = H // (mesh.shape["tensor"] if qs[1] else 1)
    kernel = _kernel(local_heads, Tp, block, sliding_window, interpret)

    def local(q, k, v, seg):
        return jax.vmap(kernel)(q, k, v, sk.SegmentIds(seg, seg))
    if multi:
        local = jax.shard_map(local, mesh=mesh, in_specs=(qs, qs, qs, ss), out_specs=qs,
                              check_vma=False)
    return local(*args)[:, :, :T].transpose(0, 2, 1, 3)
