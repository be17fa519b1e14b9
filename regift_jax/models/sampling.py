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
  shardings (same mesh and rules as :mod:`regift_jax.core.sharding`); the KV cache is laid out by
  :func:`cache_shardings` (batch over the data axes, KV heads over ``tensor``), the one layout
  the preflight compiles the decode program with.  A mesh may span several processes (a
  multi-host slice): every process then calls ``generate`` with the same prompts in lockstep,
  fills only its own devices and reads every row back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from regift_jax.core.sharding import (DEFAULT_RULES, activation_sharding, batch_shards,
                                     batch_sharding, logical_to_spec)
from regift_jax.core.shapes import round_up
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import Decoder, init_cache, positions_from_mask
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: tuple = ()
    seed: int = 0


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


@dataclasses.dataclass
class _BatchState:
    """One batch's device state between decode chunks and phases; ``seeds``: one per row."""
    cache: dict
    logits: jax.Array
    last_pos: jax.Array
    seeds: List[int]


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


# Logical axes of every array of ``decoder.init_cache``: rows follow the prompts' batch
# sharding and KV heads the attention projections' ``tensor`` sharding, so each chip attends
# with its own heads over its own rows and the cache never moves between chips.
CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "head_dim", "length"),
              "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
              "pos": ("batch", "length"), "seg": ("batch", "length"), "index": ()}


def cache_shardings(mesh, rules=DEFAULT_RULES, cache=None) -> dict:
    """NamedShardings of a KV cache on ``mesh`` (the sampler's and the preflight's layout).
    ``cache`` (arrays or ``ShapeDtypeStruct`` s): its shapes let an axis that does not divide a
    dimension (a one-row prefix, 3 KV heads over tensor=2) be replicated instead of failing."""
    return {name: NamedSharding(mesh, logical_to_spec(
                axes, None if cache is None else cache[name].shape, mesh, rules))
            for name, axes in CACHE_AXES.items()}


def _constrain_cache(cache, mesh, rules):
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(mesh, rules, cache))


def _call(params, ids, pos, seg, cache, cfg, run, lora, mesh=None, rules=DEFAULT_RULES):
    with activation_sharding(mesh, rules):  # the decoder's activations laid out on the mesh
        return Decoder(cfg, run, lora).apply({"params": params}, ids, positions=pos,
                                             segment_ids=seg, cache=cache)


# Static: ``run`` / ``lora``, how the model computes and its adapters (see run_config.py);
# ``mesh`` / ``rules``, lay the new cache out by :func:`cache_shardings` (else XLA picks).
@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "run", "lora", "mesh", "rules"))
def prefill(params, input_ids, attention_mask, cfg: ModelConfig, cache_len: int,
            run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA, mesh=None,
            rules=DEFAULT_RULES):
    B = input_ids.shape[0]
    cache = _constrain_cache(init_cache(cfg, B, cache_len, run.dtype), mesh, rules)
    pos = positions_from_mask(attention_mask)
    logits, cache = _call(params, input_ids, pos, attention_mask.astype(jnp.int32), cache, cfg,
                          run, lora, mesh, rules)
    return logits[:, -1, :], _constrain_cache(cache, mesh, rules), pos[:, -1]


@functools.partial(jax.jit, static_argnames=("cfg", "run", "lora", "mesh", "rules"),
                   donate_argnames=("cache",))
def extend(params, cache, input_ids, attention_mask, last_pos, logits, cfg: ModelConfig,
           run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA, mesh=None,
           rules=DEFAULT_RULES):
    """Append a left-padded block of tokens [B, K] to every row's cache (padding slots get
    segment 0 and are never attended).  Rows whose block is all padding keep their logits."""
    m = attention_mask.astype(jnp.int32)
    pos = last_pos[:, None] + jnp.cumsum(m, axis=1)
    new_logits, cache = _call(params, input_ids, pos, m, cache, cfg, run, lora, mesh, rules)
    n = jnp.sum(m, axis=1)
    logits = jnp.where((n > 0)[:, None], new_logits[:, -1, :], logits)
    return logits, _constrain_cache(cache, mesh, rules), last_pos + n


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "temperature", "top_p", "top_k",
                                             "run", "lora"), donate_argnames=("cache",))
def decode_chunk(params, cache, logits, last_pos, done, out_tokens, n_out, row_keys, eos_ids,
                 pad_id, cfg: ModelConfig, n_steps: int, temperature: float, top_p: float,
                 top_k: int, run: RunConfig = RunConfig(), lora: LoraConfig = NO_LORA):
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
                                  (~done).astype(jnp.int32)[:, None], cache, cfg, run, lora)
        done = done | is_eos
        return (i + 1, cache, new_logits[:, -1, :], pos, done, out_tokens, n_out + 1)

    s = (jnp.zeros((), jnp.int32), cache, logits, last_pos, done, out_tokens, n_out)
    _, cache, logits, last_pos, done, out_tokens, n_out = jax.lax.while_loop(cond, body, s)
    return cache, logits, last_pos, done, out_tokens, n_out


@functools.partial(jax.jit, static_argnames=("reps", "mesh", "rules"))
def _tile_rows(cache, logits, last_pos, reps: int, mesh=None, rules=DEFAULT_RULES):
    """Repeat a 1-row prefilled state ``reps`` times along the batch."""
    c = dict(cache)
    for name, axes in CACHE_AXES.items():
        if "batch" in axes:
            c[name] = jnp.repeat(cache[name], reps, axis=axes.index("batch"))
    return (_constrain_cache(c, mesh, rules), jnp.repeat(logits, reps, axis=0),
            jnp.repeat(last_pos, reps, axis=0))


def to_host(x) -> np.ndarray:
    """A device array whole on this host; rows on other hosts' devices are gathered."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hashable_rules(rules) -> tuple:
    """``rules`` as nested tuples: a static ``jit`` argument (config rules arrive as lists)."""
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in rules)


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
    * ``then``: an optional :class:`Continuation` phase: after the first phase the harness
      appends ``forced_texts[i]`` to row i (e.g. closing a reasoning scaffold:
      ``"</think>\n<answer>"``) and samples again on the same cache.  Tokens the first phase
      produced after its stop string are masked out of the cache, so the second phase sees
      exactly the returned text.  The returned ``Generation.text`` is ``first + forced + second``.
    """

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, mesh=None, batch_size: int = 8,
                 length_bucket: int = 64, chunk: int = 32, pad_id: Optional[int] = None,
                 eos_ids: Optional[Sequence[int]] = None, bridge_tokens: int = 16,
                 cache_len: Optional[int] = None, run: RunConfig = RunConfig(),
                 lora: LoraConfig = NO_LORA, rules=DEFAULT_RULES):
        """``cache_len``: a fixed KV-cache length for every batch (one compiled decode program
        for a whole run; a batch that needs more raises).  Default: sized per batch.  ``run`` /
        ``lora``: how the model computes and its adapters (default float32, none).
        ``rules``: the logical-axis rules the params were placed with (batch and cache).
        With a mesh, ``batch_size`` is rounded up to a multiple of the batch shards (filler rows
        are padding)."""
        self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
        self.run, self.lora = run, lora
        self.rules = _hashable_rules(rules)
        self.fixed_cache_len = cache_len
        batch_size = round_up(batch_size, batch_shards(mesh, rules))
        self.batch_size, self.length_bucket, self.chunk = batch_size, length_bucket, chunk
        self.bridge_tokens = bridge_tokens
        if pad_id is None:
            pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.pad_id = int(pad_id)
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else cfg.eos_token_ids
        if not self.eos_ids:
            self.eos_ids = (-1,)

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

    # ------------------------------------------------------------------ text and placement
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

    def _strip(self, row) -> List[int]:
        """A row's tokens up to (without) its first EOS."""
        out = []
        for t in row:
            if int(t) in self.eos_ids:
                break
            out.append(int(t))
        return out

    def _place(self, x, replicate: bool = False):
        """A host array on the mesh, rows over the data axes (``replicate``: whole on every
        device).  Each process fills its own devices from the same value (lockstep)."""
        if self.mesh is None:
            return jnp.asarray(x)
        x = np.asarray(x)
        sh = (NamedSharding(self.mesh, PartitionSpec()) if replicate or x.ndim == 0
              else batch_sharding(self.mesh, self.rules, ndim=x.ndim))
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    def _left_pad(self, rows, T, B):
        ids = np.full((B, T), self.pad_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for r, e in enumerate(rows):
            if len(e):
                ids[r, T - len(e):] = e
                mask[r, T - len(e):] = 1
        return ids, mask

    # ------------------------------------------------------------------ one batch
    def _generate_batch(self, encoded, sampling: SamplingConfig, seeds, pre, then
                        ) -> List[Generation]:
        T = round_up(max(1, max(len(e) for e in encoded)), self.length_bucket)
        P = round_up(len(pre), self.length_bucket) if pre else 0
        st = self._prefill(encoded, pre, T, P, self._cache_len(P, T, sampling, then), seeds)
        pos0 = to_host(st.last_pos)
        first, start = self._run_phase(st, sampling, len(encoded))
        if then is None:
            return [Generation(text=text, token_ids=row, finish_reason=reason,
                               prompt_tokens=len(pre) + len(encoded[r]),
                               generated_tokens=len(row))
                    for r, (row, reason, text) in enumerate(first)]
        return self._continue(st, first, start, pos0, then,
                              [len(pre) + len(e) for e in encoded])

    def _cache_len(self, P: int, T: int, sampling: SamplingConfig,
                   then: Optional[Continuation]) -> int:
        """KV-cache slots for a prefix of ``P``, prompts of ``T`` and both phases' tokens."""
        extra = 0
        if then is not None:
            extra = self.bridge_tokens + round_up(then.sampling.max_new_tokens,
                                                  self.length_bucket)
        cache_len = P + T + round_up(sampling.max_new_tokens, self.length_bucket) + extra
        if not self.fixed_cache_len:
            return cache_len
        if cache_len > self.fixed_cache_len:
            raise ValueError(f"batch needs a KV cache of {cache_len} slots (prefix {P}, "
                             f"prompts {T}, generation {cache_len - P - T}) but the sampler "
                             f"was built with cache_len={self.fixed_cache_len}")
        return self.fixed_cache_len

    def _prefill(self, encoded, pre, T: int, P: int, cache_len: int, seeds) -> _BatchState:
        """Run the prefix (once, then copied to every row) and the prompts into a new cache."""
        B, n = self.batch_size, len(encoded)
        rows = list(encoded) + [[self.pad_id]] * (B - n)  # filler rows: one token each
        ids, mask = self._left_pad(rows, T, B)
        lay = dict(run=self.run, lora=self.lora, mesh=self.mesh, rules=self.rules)
        if pre:
            pids, pmask = self._left_pad([pre], P, 1)
            logits, cache, last_pos = prefill(self.params, self._place(pids, True),
                                              self._place(pmask, True), self.cfg, cache_len,
                                              **lay)
            cache, logits, last_pos = _tile_rows(cache, logits, last_pos, B, mesh=self.mesh,
                                                 rules=self.rules)
            logits, cache, last_pos = extend(self.params, cache, self._place(ids),
                                             self._place(mask), last_pos, logits, self.cfg,
                                             **lay)
        else:
            logits, cache, last_pos = prefill(self.params, self._place(ids),
                                              self._place(mask), self.cfg, cache_len, **lay)
        return _BatchState(cache, logits, last_pos, list(seeds) + [0] * (B - n))

    def _continue(self, st: _BatchState, first, start: int, pos0, then: Continuation,
                  prompt_tokens: List[int]) -> List[Generation]:
        """The :class:`Continuation` phase: forced text, then sampling on the same cache."""
        n, B = len(first), self.batch_size
        forced = list(then.forced([t for _, _, t in first]))
        keep = np.zeros((B,), np.int64)
        keep[:n] = [len(row) for row, _, _ in first]
        # Mask what phase 1 generated beyond each row's kept tokens; rewind positions.
        slots = np.arange(st.cache["seg"].shape[1])[None, :]
        kill = (slots >= start + keep[:, None]) & (slots < int(to_host(st.cache["index"])))
        cache = dict(st.cache)
        cache["seg"] = jnp.where(self._place(kill), 0, cache["seg"])
        last_pos = self._place((pos0 + keep).astype(np.int32))
        f_ids = [self._encode(f) for f in forced] + [[]] * (B - n)
        K = max(1, max(len(f) for f in f_ids))
        if K > self.bridge_tokens:
            raise ValueError(f"continuation text of {K} tokens exceeds bridge_tokens="
                             f"{self.bridge_tokens}")
        fid, fmask = self._left_pad(f_ids, self.bridge_tokens, B)
        st.logits, st.cache, st.last_pos = extend(self.params, cache, self._place(fid),
                                                  self._place(fmask), last_pos, st.logits,
                                                  self.cfg, run=self.run, lora=self.lora,
                                                  mesh=self.mesh, rules=self.rules)
        second, _ = self._run_phase(st, then.sampling, n)
        return [Generation(text=t1 + forced[r] + t2, token_ids=row1 + f_ids[r] + row2,
                           finish_reason=reason, prompt_tokens=prompt_tokens[r],
                           generated_tokens=len(row1) + len(row2))
                for r, ((row1, _, t1), (row2, reason, t2)) in enumerate(zip(first, second))]

    # ------------------------------------------------------------------ one phase
    def _run_phase(self, st: _BatchState, sampling: SamplingConfig, n_rows: int
                   ) -> Tuple[List[tuple], int]:
        """Decode until every row is done: per-row ``(tokens, finish_reason, text)`` and the
        cache index where the phase's tokens start."""
        start = int(to_host(st.cache["index"]))
        toks = self._decode_rows(st, sampling, n_rows)
        return [self._finish_row(toks[r], sampling.stop_strings) for r in range(n_rows)], start

    def _decode_rows(self, st: _BatchState, sampling: SamplingConfig, n_rows: int) -> np.ndarray:
        """Decode chunks of steps until every row has stopped (EOS on device, stop strings on
        the host between chunks) or ``max_new_tokens``; the tokens ``[B, steps]``."""
        B, max_new = self.batch_size, sampling.max_new_tokens
        base = jax.random.PRNGKey(sampling.seed)
        keys = self._place(np.stack([np.asarray(jax.random.fold_in(base, int(s)))
                                     for s in st.seeds]))
        done = np.zeros((B,), bool)
        done[n_rows:] = True
        done = self._place(done)
        out = self._place(np.full((B, max_new), self.pad_id, np.int32))
        n_out = self._place(np.zeros((), np.int32))
        eos = self._place(np.asarray(self.eos_ids, np.int32), True)
        pad = self._place(np.asarray(self.pad_id, np.int32))
        while True:
            st.cache, st.logits, st.last_pos, done, out, n_out = decode_chunk(
                self.params, st.cache, st.logits, st.last_pos, done, out, n_out, keys, eos,
                pad, self.cfg, self.chunk, float(sampling.temperature),
                float(sampling.top_p), int(sampling.top_k), run=self.run, lora=self.lora)
            n_done = int(to_host(n_out))
            done_h = to_host(done).copy()
            if sampling.stop_strings and self.tokenizer is not None:
                toks = to_host(out)[:, :n_done]
                for r in range(n_rows):
                    if not done_h[r] and any(x in self._decode(self._strip(toks[r]))
                                             for x in sampling.stop_strings):
                        done_h[r] = True
                done = self._place(done_h)
            if done_h.all() or n_done >= max_new:
                return to_host(out)[:, :n_done]

    def _finish_row(self, toks, stop_strings) -> tuple:
        """``(tokens, finish_reason, text)`` of one row: cut at EOS, then at the first stop
        string (the text ends with it; the tokens end with the one that completes it)."""
        row = self._strip(toks)
        reason = "eos" if len(row) < len(toks) else "length"
        text = self._decode(row)
        hits = [(text.find(x), x) for x in stop_strings if x in text]
        if hits:
            p, x = min(hits)
            text = text[:p + len(x)]
            reason = "stop"
            while len(row) > 1 and len(self._decode(row[:-1])) >= p + len(x):
                row = row[:-1]
        return row, reason, text
