"""The one sampler, shared by teacher trace generation and BBQ evaluation.

* ``prefill`` (jitted): a left-padded batch of prompts runs through the decoder once, filling a
  KV cache of ``prompt_len + max_new_tokens`` slots.
* ``decode_chunk`` (jitted): a ``lax.while_loop`` of single-token decode steps over the cache,
  ``chunk`` steps at a time; stops early when every row is done.  Between chunks the host checks
  *stop strings* on the decoded text (a stop string can be tokenized many ways, so it is matched
  on text, exactly) and marks rows done; EOS ids are checked on device every step.
* Decoding: greedy (``temperature == 0``), temperature, top-k and top-p (nucleus; the smallest
  prefix of the sorted distribution whose mass reaches ``top_p``, always keeping the top token).
* Every row owns a PRNG key ``fold_in(PRNGKey(seed), row_seed)`` and step ``t`` uses
  ``fold_in(row_key, t)``, so a row's sample does not depend on its batch neighbours or on how the
  prompts were batched.
* Prompts are bucketed (length rounded up to ``length_bucket``, batch padded to ``batch_size``) so
  a long run compiles a handful of programs, not one per batch.
* With a ``mesh`` the batch is sharded over the data axes and params keep their training
  shardings (same mesh and rules as :mod:`regift_jax.core.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import (Decoder, forward_unrolled, init_cache, positions_from_mask,
                                       unstack_params)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: tuple = ()
    seed: int = 0

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["stop_strings"] = list(self.stop_strings)
        return d


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A second phase: ``forced(texts) -> list of strings`` appended to each row's first-phase
    text, then sampling with ``sampling`` on the same cache."""
    forced: Callable[[List[str]], List[str]]
    sampling: SamplingConfig


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: List[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    generated_tokens: int


def filter_logits(logits, temperature: float, top_p: float, top_k: int):
    """Temperature, top-k and top-p applied to float32 logits [B, V] (static settings)."""
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        # Nucleus by bisection on the probability threshold t: keep p >= t for the largest t
        # whose kept mass reaches top_p (the sort-based definition, up to exact ties; a full
        # sort of the vocabulary per step costs more than the model on a CPU).
        probs = jax.nn.softmax(logits, axis=-1)
        lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.float32)
        hi = jnp.max(probs, axis=-1, keepdims=True)

        def bisect(_, lh):
            lo, hi = lh
            mid = 0.5 * (lo + hi)
            ok = jnp.sum(jnp.where(probs >= mid, probs, 0.0), -1, keepdims=True) >= top_p
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
        logits = jnp.where(probs >= lo, logits, neg)
    return logits


def sample_next(logits, row_keys, step, temperature: float, top_p: float, top_k: int):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filt = filter_logits(logits, temperature, top_p, top_k)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    return jax.vmap(jax.random.categorical)(keys, filt).astype(jnp.int32)


def _call(params, ids, pos, seg, cache, cfg, unrolled):
    if unrolled:
        return forward_unrolled(cfg, params, ids, pos, seg, cache)
    return Decoder(cfg).apply({"params": params}, ids, positions=pos, segment_ids=seg,
                              cache=cache)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "unrolled"))
def prefill(params, input_ids, attention_mask, cfg: ModelConfig, cache_len: int,
            unrolled: bool = False):
    B = input_ids.shape[0]
    cache = init_cache(cfg, B, cache_len, unrolled=unrolled)
    pos = positions_from_mask(attention_mask)
    logits, cache = _call(params, input_ids, pos, attention_mask.astype(jnp.int32), cache, cfg,
                          unrolled)
    return logits[:, -1, :], cache, pos[:, -1]


@functools.partial(jax.jit, static_argnames=("cfg", "unrolled"), donate_argnames=("cache",))
def extend(params, cache, input_ids, attention_mask, last_pos, logits, cfg: ModelConfig,
           unrolled: bool = False):
    """Append a left-padded block of tokens [B, K] to every row's cache (padding slots get
    segment 0 and are never attended).  Rows whose block is all padding keep their logits."""
    m = attention_mask.astype(jnp.int32)
    pos = last_pos[:, None] + jnp.cumsum(m, axis=1)
    new_logits, cache = _call(params, input_ids, pos, m, cache, cfg, unrolled)
    n = jnp.sum(m, axis=1)
    logits = jnp.where((n > 0)[:, None], new_logits[:, -1, :], logits)
    return logits, cache, last_pos + n


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "temperature", "top_p", "top_k",
                                             "unrolled"),
                   donate_argnames=("cache",))
def decode_chunk(params, cache, logits, last_pos, done, out_tokens, n_out, row_keys, eos_ids,
                 pad_id, cfg: ModelConfig, n_steps: int, temperature: float, top_p: float,
                 top_k: int, unrolled: bool = False):
    """Up to ``n_steps`` decode steps.  ``out_tokens`` [B, max_new] is written at ``n_out``.
    Finished rows write padding with segment 0 into their cache slot, so a later continuation of
    the same cache never attends to it."""
    max_new = out_tokens.shape[1]

    def cond(s):
        i, _, _, _, done, _, n_out = s
        return (i < n_steps) & ~jnp.all(done) & (n_out < max_new)

    def body(s):
        i, cache, logits, last_pos, done, out_tokens, n_out = s
        tok = sample_next(logits, row_keys, n_out, temperature, top_p, top_k)
        tok = jnp.where(done, pad_id, tok)
        is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1) & ~done
        out_tokens = jax.lax.dynamic_update_slice(out_tokens, tok[:, None], (0, n_out))
        pos = jnp.where(done, last_pos, last_pos + 1)
        new_logits, cache = _call(params, tok[:, None], pos[:, None],
                                  (~done).astype(jnp.int32)[:, None], cache, cfg, unrolled)
        done = done | is_eos
        return (i + 1, cache, new_logits[:, -1, :], pos, done, out_tokens, n_out + 1)

    s = (jnp.zeros((), jnp.int32), cache, logits, last_pos, done, out_tokens, n_out)
    _, cache, logits, last_pos, done, out_tokens, n_out = jax.lax.while_loop(cond, body, s)
    return cache, logits, last_pos, done, out_tokens, n_out


@functools.partial(jax.jit, static_argnames=("reps",))
def _tile_rows(cache, logits, last_pos, reps: int):
    """Repeat a 1-row prefilled state ``reps`` times along the batch."""
    c = dict(cache)
    c["k"] = jax.tree.map(lambda x: jnp.repeat(x, reps, axis=1), cache["k"])
    c["v"] = jax.tree.map(lambda x: jnp.repeat(x, reps, axis=1), cache["v"])
    c["pos"] = jnp.repeat(cache["pos"], reps, axis=0)
    c["seg"] = jnp.repeat(cache["seg"], reps, axis=0)
    return c, jnp.repeat(logits, reps, axis=0), jnp.repeat(last_pos, reps, axis=0)


def _round_up(n, m):
    return ((n + m - 1) // m) * m


class Sampler:
    """Batched generation with a KV cache.

    ``generate(prompts, sampling, row_seeds, prefix=None, then=None)``:

    * ``prompts``: strings (tokenized with ``tokenizer``, no special tokens added: render chat
      templates / BOS in the text) or lists of token ids.
    * ``prefix``: an optional text (or ids) shared by every prompt of the call, e.g. the
      instruction and context paragraph that several questions and samples share.  It is
      prefilled once and its cache copied to every row; the prompt's own tokens are appended.
      The token sequence is ``encode(prefix) + encode(prompt)``, so split the text at a
      pre-token boundary (a newline).
    * ``then``: an optional :class:`Continuation` phase: after the first phase the harness appends ``forced_texts[i]`` to row i (e.g. closing a
      reasoning scaffold: ``"</think>\n<answer>"``) and samples again on the same cache.  Tokens
      the first phase produced after its stop string are masked out of the cache, so the second
      phase sees exactly the returned text.  The returned ``Generation.text`` is
      ``first + forced + second``.
    """

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, mesh=None, batch_size: int = 8,
                 length_bucket: int = 64, chunk: int = 32, pad_id: Optional[int] = None,
                 eos_ids: Optional[Sequence[int]] = None, bridge_tokens: int = 16,
                 cache_len: Optional[int] = None, unroll_layers=False):
        """``cache_len``: a fixed KV-cache length for every batch (one compiled decode program
        for a whole run; a batch that needs more raises).  Default: sized per batch.
        ``unroll_layers``: run the layers unrolled over per-layer weights instead of the layer
        scan (a second copy of the weights, a longer compile; measured slower than the scan on
        the 2-core CPU machine, kept for accelerators); ``"auto"``: when the weights take under
        2 GiB."""
        self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
        if unroll_layers == "auto":
            nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
            unroll_layers = nbytes < 2 * 2 ** 30
        self.unrolled = bool(unroll_layers)
        self.run_params = unstack_params(params) if self.unrolled else params
        self.fixed_cache_len = cache_len
        self.batch_size, self.length_bucket, self.chunk = batch_size, length_bucket, chunk
        self.bridge_tokens = bridge_tokens
        if pad_id is None:
            pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_id = int(pad_id)
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else cfg.eos_token_ids
        if not self.eos_ids:
            self.eos_ids = (-1,)

    def _encode(self, p) -> List[int]:
        if isinstance(p, str):
            if self.tokenizer is None:
                raise ValueError("Sampler: string prompts need a tokenizer")
            return list(self.tokenizer(p, add_special_tokens=False)["input_ids"])
        return [int(t) for t in p]

    def _decode(self, ids) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        from regift_jax.core.sharding import batch_sharding
        return jax.device_put(x, batch_sharding(self.mesh, ndim=x.ndim))

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], sampling: SamplingConfig,
                 row_seeds: Optional[Sequence[int]] = None, progress=None, prefix=None,
                 then: Optional[Continuation] = None) -> List[Generation]:
        """Generate for every prompt; ``row_seeds[i]`` (default ``i``) keys row i's randomness."""
        encoded = [self._encode(p) for p in prompts]
        pre = self._encode(prefix) if prefix is not None else []
        if row_seeds is None:
            row_seeds = list(range(len(encoded)))
        results: List[Optional[Generation]] = [None] * len(encoded)
        # Sort by length so batches are tight; results are returned in input order.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(encoded), desc=progress if isinstance(progress, str) else
                       "generate", unit="seq", dynamic_ncols=True)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            gens = self._generate_batch([encoded[i] for i in idx], sampling,
                                        [row_seeds[i] for i in idx], pre, then)
            for i, g in zip(idx, gens):
                results[i] = g
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _left_pad(self, rows, T, B):
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for r, e in enumerate(rows):
            if len(e):
                ids[r, T - len(e):] = e
                mask[r, T - len(e):] = 1
        return ids, mask

    def _run_phase(self, st, sampling: SamplingConfig, n_rows: int):
        """Decode until every row is done; returns per-row (tokens, finish_reason, text)."""
        B = self.batch_size
        max_new = sampling.max_new_tokens
        base = jax.random.PRNGKey(sampling.seed)
        keys = jnp.stack([jax.random.fold_in(base, int(s)) for s in st["seeds"]])
        done = np.zeros((B,), bool)
        done[n_rows:] = True
        done = jnp.asarray(done)
        out = jnp.full((B, max_new), self.pad_id, jnp.int32)
        n_out = jnp.zeros((), jnp.int32)
        eos = jnp.asarray(self.eos_ids, jnp.int32)
        start_index = int(st["cache"]["index"])
        stopped = [False] * n_rows
        while True:
            cache, logits, last_pos, done, out, n_out = decode_chunk(
                self.run_params, st["cache"], st["logits"], st["last_pos"], done, out, n_out,
                keys, eos, jnp.int32(self.pad_id), self.cfg, self.chunk,
                float(sampling.temperature), float(sampling.top_p), int(sampling.top_k),
                self.unrolled)
            st.update(cache=cache, logits=logits, last_pos=last_pos)
            n_done = int(n_out)
            done_h = np.array(done)
            if sampling.stop_strings and self.tokenizer is not None:
                toks = np.asarray(out[:, :n_done])
                for r in range(n_rows):
                    if done_h[r]:
                        continue
                    text = self._decode(self._strip(toks[r]))
                    if any(x in text for x in sampling.stop_strings):
                        stopped[r] = True
                        done_h[r] = True
                done = jnp.asarray(done_h)
            if done_h.all() or n_done >= max_new:
                break
        toks = np.asarray(out[:, :int(n_out)])
        res = []
        for r in range(n_rows):
            row = self._strip(toks[r])
            reason = "eos" if len(row) < len(toks[r]) else "length"
            text = self._decode(row)
            if sampling.stop_strings:
                hits = [(text.find(x), x) for x in sampling.stop_strings if x in text]
                if hits:
                    p, x = min(hits)
                    text = text[:p + len(x)]
                    reason = "stop"
                    while len(row) > 1 and len(self._decode(row[:-1])) >= p + len(x):
                        row = row[:-1]
            res.append((row, reason, text))
        st["start_index"] = start_index
        return res

    def _generate_batch(self, encoded, sampling: SamplingConfig, seeds, pre, then
                        ) -> List[Generation]:
        n = len(encoded)
        B = self.batch_size
        T = _round_up(max(1, max(len(e) for e in encoded)), self.length_bucket)
        P = _round_up(len(pre), self.length_bucket) if pre else 0
        extra = 0
        if then is not None:
            extra = self.bridge_tokens + _round_up(then.sampling.max_new_tokens,
                                                   self.length_bucket)
        cache_len = P + T + _round_up(sampling.max_new_tokens, self.length_bucket) + extra
        if self.fixed_cache_len:
            if cache_len > self.fixed_cache_len:
                raise ValueError(f"batch needs a KV cache of {cache_len} slots (prefix {P}, "
                                 f"prompts {T}, generation {cache_len - P - T}) but the sampler "
                                 f"was built with cache_len={self.fixed_cache_len}")
            cache_len = self.fixed_cache_len
        rows = list(encoded) + [[self.pad_id]] * (B - n)  # filler rows: one token each
        ids, mask = self._left_pad(rows, T, B)
        if pre:
            pids, pmask = self._left_pad([pre], P, 1)
            logits, cache, last_pos = prefill(self.run_params, jnp.asarray(pids),
                                              jnp.asarray(pmask), self.cfg, cache_len,
                                              self.unrolled)
            cache, logits, last_pos = _tile_rows(cache, logits, last_pos, B)
            logits, cache, last_pos = extend(self.run_params, cache, self._place(ids),
                                             self._place(mask), last_pos, logits, self.cfg,
                                             self.unrolled)
        else:
            logits, cache, last_pos = prefill(self.run_params, self._place(ids),
                                              self._place(mask), self.cfg, cache_len,
                                              self.unrolled)
        st = {"cache": cache, "logits": logits, "last_pos": last_pos,
              "seeds": list(seeds) + [0] * (B - n)}
        pos0 = np.asarray(last_pos)
        first = self._run_phase(st, sampling, n)
        gens = []
        if then is None:
            for r, (row, reason, text) in enumerate(first):
                gens.append(Generation(text=text, token_ids=row, finish_reason=reason,
                                       prompt_tokens=len(pre) + len(encoded[r]),
                                       generated_tokens=len(row)))
            return gens
        forced = list(then.forced([t for _, _, t in first]))
        sampling2 = then.sampling
        # Mask what phase 1 generated beyond each row's kept tokens; rewind positions.
        cache = st["cache"]
        start = st["start_index"]
        keep = np.zeros((B,), np.int64)
        keep[:n] = [len(row) for row, _, _ in first]
        slots = np.arange(cache["seg"].shape[1])[None, :]
        kill = (slots >= start + keep[:, None]) & (slots < int(cache["index"]))
        cache = dict(cache)
        cache["seg"] = jnp.where(jnp.asarray(kill), 0, cache["seg"])
        last_pos = jnp.asarray(pos0 + keep, jnp.int32)
        f_ids = [self._encode(f) for f in forced] + [[]] * (B - n)
        K = max(1, max(len(f) for f in f_ids))
        if K > self.bridge_tokens:
            raise ValueError(f"continuation text of {K} tokens exceeds bridge_tokens="
                             f"{self.bridge_tokens}")
        fid, fmask = self._left_pad(f_ids, self.bridge_tokens, B)
        logits, cache, last_pos = extend(self.run_params, cache, self._place(fid),
                                         self._place(fmask), last_pos, st["logits"], self.cfg,
                                         self.unrolled)
        st.update(cache=cache, logits=logits, last_pos=last_pos)
        second = self._run_phase(st, sampling2, n)
        for r in range(n):
            row1, _, t1 = first[r]
            row2, reason, t2 = second[r]
            gens.append(Generation(text=t1 + forced[r] + t2,
                                   token_ids=row1 + f_ids[r] + row2, finish_reason=reason,
                                   prompt_tokens=len(pre) + len(encoded[r]),
                                   generated_tokens=len(row1) + len(row2)))
        return gens

    def _strip(self, row):
        out = []
        for t in row:
            if int(t) in self.eos_ids:
                break
            out.append(int(t))
        return out
