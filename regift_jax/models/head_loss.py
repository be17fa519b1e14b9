"""LM head + token cross-entropy computed on the loss positions only, in chunks.

SFT batches score only the response tokens: in the default run about one slot in six carries a
loss (prompt and padding carry none), yet ``logits = h @ W`` over every slot followed by a
softmax is the single largest matmul of a small-model step (``[B*T, D] x [D, V]`` with
``V = 49,152`` for SmolLM2), and the float32 ``[B, T, V]`` logits and their gradient are the
largest activations.  :func:`head_loss` instead

1. orders the flattened positions so the loss positions come first (stable),
2. runs a ``lax.while_loop`` over chunks of ``chunk`` positions that stops after the last chunk
   holding a loss position (a data-dependent trip count: padding and prompt cost nothing),
3. and, when differentiated, computes the gradient with respect to the hidden states (and the
   head weights, when they are trained) inside the same loop, chunk by chunk: ``d = (softmax -
   onehot) * mask``, ``dh = d W^T``, ``dW += h^T d``.  The ``[chunk, V]`` logits are never
   stored for the backward pass (the fused linear cross-entropy of Liger-Kernel / Apple's
   cut-cross-entropy, written in plain JAX).

On a mesh (a program traced in :func:`regift_jax.models.decoder.trace_context`) the loop runs
per batch shard in ``shard_map``: each chip orders and chunks its own rows' positions, with the
head weights gathered once before the loop (in the compute dtype), and the head's gradient is
reduce-scattered once after it.  Without this, a chunk of positions from every shard met the
FSDP-sharded head and XLA all-reduced each chunk's float32 logits (``f32[512, 128256]``, 250 MiB
per chunk for Llama-3.1-8B, by the TPU preflight).

The result is the same ``(sum of masked NLL, number of loss tokens, number of correct argmax
predictions)`` as :func:`regift_jax.training.step.token_loss` on full logits
(``tests/test_head_loss.py`` checks values and gradients against it).  The head weights' gradient
is computed only when they are differentiated (full fine-tuning with tied embeddings); under LoRA
they are frozen and skip it.  Each chunk's logits come from the decoder's own LM-head matmul,
:func:`regift_jax.models.decoder.head_logits`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from regift_jax.core import sharding as shd
from regift_jax.models.decoder import head_logits, to_dtype


def _run(h, w, targets, mask, chunk: int, vocab_major: bool, dtype: str, want_dh: bool,
         want_dw: bool):
    """The chunk loop.  h [N, D]; targets [N] int; mask [N] float (0 = no loss).
    Returns (sum_nll, n_tokens, n_correct, dh [N, D] f32 or None, dw (w's shape) f32 or None)
    where dh / dw are the gradients of sum_nll."""
    dt = to_dtype(dtype)
    N, D = h.shape
    m = mask.astype(jnp.float32)
    order = jnp.argsort(m <= 0, stable=True).astype(jnp.int32)  # loss positions first
    n_pos = jnp.sum(m > 0).astype(jnp.int32)
    n_chunks = (n_pos + chunk - 1) // chunk
    n_pad = -(-N // chunk) * chunk
    # Sentinel row N: zero hidden state, mask 0 (fills the last chunk).
    order = jnp.pad(order, (0, n_pad - N), constant_values=N)
    hp = jnp.pad(h, ((0, 1), (0, 0)))
    tp = jnp.pad(targets.astype(jnp.int32), (0, 1))
    mp = jnp.pad(m, (0, 1))
    rows = jnp.arange(chunk)

    def body(state):
        i, s, n_ok, dh, dw = state
        idx = jax.lax.dynamic_slice(order, (i * chunk,), (chunk,))
        hc, tc, mc = hp[idx], tp[idx], mp[idx]
        logits = head_logits(hc, w, vocab_major, dtype)  # [C, V] f32
        lse = jax.nn.logsumexp(logits, axis=-1)
        tl = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        s = s + jnp.sum((lse - tl) * mc)
        n_ok = n_ok + jnp.sum((jnp.argmax(logits, axis=-1) == tc).astype(jnp.float32) * mc)
        if want_dh or want_dw:
            d = jnp.exp(logits - lse[:, None])
            d = d.at[rows, tc].add(-1.0) * mc[:, None]  # d sum_nll / d logits
            dd = d.astype(dt)
            if want_dh:
                spec = "cv,vd->cd" if vocab_major else "cv,dv->cd"
                g = jnp.einsum(spec, dd, w.astype(dt), preferred_element_type=jnp.float32)
                dh = dh.at[idx].add(g)  # distinct rows, the sentinel absorbs the fill
            if want_dw:
                spec = "cv,cd->vd" if vocab_major else "cv,cd->dv"
                dw = dw + jnp.einsum(spec, dd, hc.astype(dt), preferred_element_type=jnp.float32)
        return i + 1, s, n_ok, dh, dw

    zero = jnp.zeros((), jnp.float32)
    dh0 = jnp.zeros((N + 1, D), jnp.float32) if want_dh else zero
    dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else zero
    state = (jnp.zeros((), jnp.int32), zero, zero, dh0, dw0)
    _, s, n_ok, dh, dw = jax.lax.while_loop(lambda st: st[0] < n_chunks, body, state)
    return (s, jnp.sum(m), n_ok, dh[:N] if want_dh else None, dw if want_dw else None)


def _rows(h, w, targets, mask, chunk, vocab_major, dtype, want_dh, want_dw):
    """:func:`_run` on rows ``h [R, T, D]`` (``dh`` back in that shape)."""
    R, T, D = h.shape
    s, n, c, dh, dw = _run(h.reshape(-1, D), w, targets.reshape(-1), mask.reshape(-1), chunk,
                           vocab_major, dtype, want_dh, want_dw)
    return s, n, c, None if dh is None else dh.reshape(R, T, D), dw


def _to_shard(dw, wspec, batch_axes, mesh):
    """The head gradient summed over the batch shards, as this chip's block of ``wspec``."""
    todo = list(batch_axes)
    for dim, axes in enumerate(wspec):
        for a in shd.axis_names(axes):
            if a in todo:  # the gradient is split where it is summed
                dw = jax.lax.psum_scatter(dw, a, scatter_dimension=dim, tiled=True)
                todo.remove(a)
            else:  # every chip along ``a`` holds the same sum: keep its block
                n = dw.shape[dim] // mesh.shape[a]
                dw = jax.lax.dynamic_slice_in_dim(dw, jax.lax.axis_index(a) * n, n, axis=dim)
    return jax.lax.psum(dw, tuple(todo)) if todo else dw


def _loss(h, w, targets, mask, chunk, vocab_major, dtype, want_dh, want_dw):
    """:func:`_rows`, per batch shard in ``shard_map`` when traced on a mesh."""
    ctx = shd.active_activation_sharding()
    args = (chunk, vocab_major, dtype, want_dh, want_dw)
    if ctx is None:
        return _rows(h, w, targets, mask, *args)
    mesh, rules = ctx
    b = shd.logical_to_spec(("batch",), h.shape[:1], mesh, rules)[0]
    baxes = shd.axis_names(b)
    if not baxes:
        return _rows(h, w, targets, mask, *args)
    wspec = shd.logical_to_spec(("vocab", "embed") if vocab_major else ("embed", "vocab"),
                                w.shape, mesh, rules)
    dt = to_dtype(dtype)

    def local(h, w, t, m):
        w = w.astype(dt)  # gathered in the compute dtype, once, before the chunk loop
        for dim, axes in enumerate(wspec):
            if shd.axis_names(axes):
                w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
        s, n, c, dh, dw = _rows(h, w, t, m, *args)
        out = tuple(jax.lax.psum(x, baxes) for x in (s, n, c))
        out += (dh,) if want_dh else ()
        return out + ((_to_shard(dw, wspec, baxes, mesh),) if want_dw else ())

    out_specs = (P(), P(), P()) + ((P(b, None, None),) if want_dh else ()) + (
        (wspec,) if want_dw else ())
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(b, None, None), wspec, P(b, None),
                                                    P(b, None)),
                        out_specs=out_specs, check_vma=False)(h, w, targets, mask)
    s, n, c, rest = out[0], out[1], out[2], list(out[3:])
    dh = rest.pop(0) if want_dh else None
    return s, n, c, dh, rest.pop(0) if want_dw else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_loss(h, w, targets, mask, chunk, vocab_major, dtype):
    s, n, c, _, _ = _loss(h, w, targets, mask, chunk, vocab_major, dtype, False, False)
    return s, n, c


def _fwd(h, w, targets, mask, chunk, vocab_major, dtype):
    # symbolic_zeros=True: each differentiable argument arrives as CustomVJPPrimal(value,
    # perturbed), so the head weights' gradient is only computed when they are trained.
    s, n, c, dh, dw = _loss(h.value, w.value, targets.value, mask.value, chunk, vocab_major,
                            dtype, h.perturbed, w.perturbed)
    # Zero-size arrays carry the input dtypes (residuals must be arrays).
    return (s, n, c), (dh, dw, jnp.zeros((0,), h.value.dtype), jnp.zeros((0,), w.value.dtype))


def _bwd(chunk, vocab_major, dtype, res, cts):
    dh, dw, h_marker, w_marker = res
    g = cts[0]
    if isinstance(g, SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    gh = None if dh is None else (g * dh).astype(h_marker.dtype)
    gw = None if dw is None else (g * dw).astype(w_marker.dtype)
    return gh, gw, None, None


_head_loss.defvjp(_fwd, _bwd, symbolic_zeros=True)


def head_loss(hidden, w, targets, loss_mask, *, chunk: int = 512, vocab_major: bool = True,
              dtype: str = "float32"):
    """``(sum of masked NLL, number of loss tokens, correct argmax predictions)`` of
    ``logits = hidden @ head`` against ``targets`` where ``loss_mask`` is non-zero.

    ``hidden`` [..., D] (the final-norm output); ``w`` the head: ``[V, D]`` tied embedding
    (``vocab_major=True``) or ``[D, V]`` lm_head; ``targets`` / ``loss_mask`` [...];
    ``dtype`` the matmul compute dtype (accumulation and the softmax are float32)."""
    if chunk <= 0:
        raise ValueError(f"head_loss chunk must be positive, got {chunk}")
    shape = hidden.shape
    rows = hidden.reshape((-1,) + shape[-2:]) if hidden.ndim > 2 else hidden[None]
    return _head_loss(rows, w, targets.reshape(rows.shape[:2]), loss_mask.reshape(rows.shape[:2]),
                      int(chunk), bool(vocab_major), str(dtype))
