"""Log-likelihood scoring of continuations: BBQ multiple choice and StereoSet, jitted and batched.

A *request* is a context (token ids) and ``K`` continuations (token ids); its score is, per
continuation, ``sum_t log p(c_t | context, c_<t)`` (float), the number of tokens, and whether the
continuation is the model's greedy continuation (every token the argmax; lm-eval-harness's
``is_greedy``).  BBQ: context = the rendered prompt, continuations = the three answer options;
StereoSet: see :func:`stereoset_scores`.

Three exact methods, one result (``tests/test_loglik.py`` checks that they agree with each
other and with transformers):

``"prefix"`` (default, fastest)
    Four levels of a prefix tree, with the decoder's KV cache.  (1) The longest token prefix
    shared by *every* context of the call (for BBQ: the chat header, system turn and instruction,
    55 of ~110 tokens) runs once, into a one-row cache.  (2) Stage G: requests whose remaining
    contexts share a prefix of at least ``min_group_prefix`` tokens form groups of up to
    ``max_group`` (:func:`group_requests`; BBQ asks two questions, negative and non-negative,
    about every context paragraph, so the paragraph is computed once per pair); each group's
    prefix extends a copy of the shared cache, one group per row.  (3) Stage A: each request's
    own remaining tokens extend (a gathered copy of) its group's row.  (4) Stage B: the cache is
    repeated ``K`` times along the batch and each copy extends with one continuation.  Segment
    ids are 1 on tokens and 0 on padding, positions are the true positions, so every token
    attends to exactly its own prefix: options never see each other and the computation equals
    scoring ``context + option`` as one sequence.  On the six BBQ categories this runs ~52 real
    tokens (69 with padding) per item instead of 3 x ~113 (:func:`plan_prefix` counts them).
    Groups larger than two are possible but pad the shorter members' own tokens to the longest
    (BBQ's ambiguous and disambiguated items of one paragraph differ by a sentence), which
    costs more than it saves; when fewer than half of the requests fall into groups the group
    stage is skipped.
``"packed"``
    Each ``context + continuation`` is one sequence; sequences are packed first-fit into rows of
    ``seq_len`` tokens (:class:`regift_jax.data.packing.Packer`) with one segment id per sequence
    and positions restarting at 0, so packed sequences never see each other.  One forward pass per
    batch of rows, no cache.
``"unpacked"``
    One sequence per row, rows right-padded to a length bucket (the plainest reference).

In every method the LM head (``[D, V]``) runs only on the hidden states that predict a
continuation token (the decoder is called with ``return_hidden=True`` and the needed positions
are gathered), so the long prompt costs no vocabulary projection.

Shapes are bucketed so a whole run compiles a few programs: rows are ``batch_rows`` (filler rows
are all padding); group and stage A lengths are rounded up to ``length_bucket``, continuation
lengths to ``cont_bucket``; rare shapes are folded into larger ones (:func:`merge_buckets`) and
groups are sorted by shape and batched within a shape (about 20 programs for all of BBQ).  With a
mesh (``handle.mesh``) every batch is placed with
:func:`regift_jax.core.sharding.batch_sharding` (``batch_rows`` and the group rows are rounded up to
a multiple of the batch shards) and ``jit`` propagates the sharding.

Tokenisation: ``encode(context) + encode(continuation)``, each without special tokens (a chat
template already writes them); a BBQ prompt then gets the tokenizer's BOS in front when the
tokenizer adds one (the one rule of :func:`regift_jax.core.prompts.encode_prompt`, shared with
training and trace generation).  For the BBQ option texts after a chat header ending in a newline,
or after ``"Answer:"`` with the continuation ``" " + option``, this equals tokenising the joined
string; the tokens scored are exactly the continuation's own tokens.

lm-eval's BBQ requests (``request_format="lm_eval"``, :func:`lm_eval_requests`): the context is
lm-eval's prompt ``"{context}\n\nQ: {question}\nA:"`` and the continuations are its 12 choices
(:func:`regift_jax.data.bbq.lm_eval_doc`) after its target delimiter ``" "``, tokenised as lm-eval's
``TemplateLM`` does for a causal model: trailing whitespace of the context moves to the
continuation, ``encode(context + continuation)`` with the tokenizer's default special tokens is
split after ``len(encode(context))`` tokens.  The ``regift_jax`` lm-eval backend
(:mod:`regift_jax.eval.harness`) therefore scores the very same token ids.

Normalisation (BBQ, :class:`OptionScores`): ``acc`` uses the argmax of the summed log-probability
(lm-eval-harness ``acc``); the per-byte normalised sum (``sum / len(option.encode("utf-8"))``,
lm-eval-harness ``acc_norm``) and the per-token mean are returned beside it.  Ties go to the lower
option index (``np.argmax``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from regift_jax.core import prompts
from regift_jax.core.shapes import round_up
from regift_jax.core.sharding import batch_shards, batch_sharding
from regift_jax.data.bbq import lm_eval_doc
from regift_jax.data.packing import Packer, build_row, stack_rows
from regift_jax.eval.config import LOGLIK_FORMATS as FORMATS
from regift_jax.eval.config import LOGLIK_METHODS as METHODS
from regift_jax.eval.stereoset import scoring_requests
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import Decoder, init_cache, lm_head, trace_context
from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig


# --------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    """``context`` ids and ``K`` continuations (ids); ``where`` names it in error messages."""
    context: Tuple[int, ...]
    continuations: Tuple[Tuple[int, ...], ...]
    where: str = ""


@dataclasses.dataclass
class Scores:
    """Per request and continuation: ``logprob_sum`` (float64), ``n_tokens``, ``is_greedy``."""
    logprob_sum: np.ndarray  # [N, K]
    n_tokens: np.ndarray  # [N, K] int
    is_greedy: np.ndarray  # [N, K] bool
    method: str = "prefix"
    shared_prefix_tokens: int = 0
    tokens_computed: int = 0  # token slots run through the model (padding included)
    tokens_real: int = 0  # of which real tokens

    @property
    def logprob_mean(self) -> np.ndarray:
        return self.logprob_sum / np.maximum(self.n_tokens, 1)


def _check_requests(requests: Sequence[Request]) -> int:
    if not requests:
        raise ValueError("no requests to score")
    K = len(requests[0].continuations)
    for i, r in enumerate(requests):
        where = r.where or f"request {i}"
        if not r.context:
            raise ValueError(f"{where}: empty context (give at least a BOS token)")
        if len(r.continuations) != K or K == 0:
            raise ValueError(f"{where}: {len(r.continuations)} continuations, expected "
                             f"{K} like the first request (and at least one)")
        for k, c in enumerate(r.continuations):
            if not c:
                raise ValueError(f"{where}: continuation {k} has no tokens")
    return K


def merge_buckets(shapes: Sequence[Tuple[int, ...]], weights: Sequence[int],
                  threshold_tokens: int) -> Dict[Tuple[int, ...], Tuple[int, ...]]:
    """Fold rare shape buckets into larger ones to save compilations.

    ``shapes[i]`` is an item's padded shape (a tuple of lengths), ``weights`` the token cost of
    one unit of each length (e.g. ``(1, K)`` for stage A and ``K`` continuations).  Repeatedly,
    the bucket with the fewest items moves into the existing bucket that is at least as large in
    every length and costs its items the fewest extra padded tokens, if that extra is below
    ``threshold_tokens`` (roughly what one compilation costs in model time).  Returns
    ``{original shape: final shape}``; deterministic.
    """
    counts: Dict[Tuple[int, ...], int] = {}
    for sh in shapes:
        counts[sh] = counts.get(sh, 0) + 1
    moved: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
    while True:
        best = None
        for src, n in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])):
            cands = [(n * sum(w * (d - s) for w, d, s in zip(weights, dst, src)), dst)
                     for dst in sorted(counts) if dst != src
                     and all(d >= s for d, s in zip(dst, src))]
            if cands:
                cost, dst = min(cands)
                if cost < threshold_tokens:
                    best = (src, dst)
                    break
        if best is None:
            break
        src, dst = best
        counts[dst] += counts.pop(src)
        moved[src] = dst
        for k, v in list(moved.items()):
            if v == src:
                moved[k] = dst
    return {sh: moved.get(sh, sh) for sh in set(shapes)}


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of all contexts, leaving each at least one own token."""
    first = contexts[0]
    n = min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        i = 0
        while i < n and c[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return max(n, 0)


# --------------------------------------------------------------------------------------------
# Jitted pieces
# --------------------------------------------------------------------------------------------

class StaticCfg:
    """A static ``jit`` argument holding the model's architecture, run settings and LoRA, keyed by
    their ``repr``: equal iff the configs print equal, so configs rebuilt from JSON (e.g. after an
    export round trip) share one compiled program."""

    def __init__(self, cfg: ModelConfig, run: RunConfig = RunConfig(),
                 lora: LoraConfig = NO_LORA):
        self.cfg, self.run, self.lora = cfg, run, lora
        self._key = repr((cfg, run, lora))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticCfg) and other._key == self._key


def _token_logprobs(params, scfg: StaticCfg, h, targets, mask):
    """Log p(target) and argmax == target for hidden states ``h [B, M, D]``."""
    logits = lm_head(params, scfg.cfg, h, scfg.run)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tl = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lp = jnp.where(mask, tl - lse, 0.0)
    hit = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    return lp, hit


@functools.partial(jax.jit, static_argnames=("scfg",))
def _prefix_state(params, ids, n_real, scfg: StaticCfg):
    """One-row KV cache of the shared prefix ``ids [1, P]`` (first ``n_real`` are tokens)."""
    cfg = scfg.cfg
    P = ids.shape[1]
    seg = (jnp.arange(P) < n_real).astype(jnp.int32)[None]
    pos = jnp.arange(P, dtype=jnp.int32)[None] * seg
    cache = init_cache(cfg, 1, P, scfg.run.dtype)
    _, cache = Decoder(cfg, scfg.run, scfg.lora).apply(
        {"params": params}, ids, positions=pos, segment_ids=seg, cache=cache, return_hidden=True)
    return cache


def cache_axes(cfg: ModelConfig) -> Dict[str, Tuple[int, int]]:
    """``{name: (batch axis, sequence axis)}`` of every array of :func:`init_cache`, found from
    abstract shapes (so this module does not depend on the cache layout)."""
    return _cache_axes(StaticCfg(cfg))


@functools.lru_cache(maxsize=None)
def _cache_axes(scfg: StaticCfg) -> Dict[str, Tuple[int, int]]:
    cfg = scfg.cfg
    base = jax.eval_shape(lambda: init_cache(cfg, 2, 5))
    more_b = jax.eval_shape(lambda: init_cache(cfg, 3, 5))
    more_s = jax.eval_shape(lambda: init_cache(cfg, 2, 7))
    out = {}
    for name, a in base.items():
        if not a.shape:
            continue
        def diff(other, name=name, a=a):
            return [i for i, (x, y) in enumerate(zip(a.shape, other[name].shape)) if x != y]
        b_ax, s_ax = diff(more_b), diff(more_s)
        if len(b_ax) != 1 or len(s_ax) != 1:
            raise ValueError(f"cannot locate the batch / sequence axes of cache[{name!r}] "
                             f"{a.shape}")
        out[name] = (b_ax[0], s_ax[0])
    return out


def _start_cache(cfg: ModelConfig, pre, B: int, S: int, dtype: str = "float32"):
    """A ``B``-row cache of ``S`` slots (``dtype``: the compute dtype) whose first slots hold the
    shared prefix ``pre``."""
    cache = init_cache(cfg, B, S, dtype)
    if pre is None:
        return cache
    out = {"index": jnp.asarray(pre["index"], jnp.int32)}
    for name, (b_ax, s_ax) in cache_axes(cfg).items():
        x = pre[name]
        shape = list(x.shape)
        shape[b_ax] = B
        x = jnp.broadcast_to(x, shape)
        tail = list(shape)
        tail[s_ax] = S - x.shape[s_ax]
        out[name] = jnp.concatenate([x, jnp.zeros(tail, x.dtype)], axis=s_ax)
    return out


def _repeat_rows(cfg: ModelConfig, cache, reps: int):
    """Every cache row repeated ``reps`` times (row ``b`` -> rows ``b*reps .. b*reps+reps-1``)."""
    out = dict(cache)
    for name, (b_ax, _) in cache_axes(cfg).items():
        out[name] = jnp.repeat(cache[name], reps, axis=b_ax)
    return out


def _take_rows(cfg: ModelConfig, cache, rows):
    """Cache rows ``rows [B]`` (a gather along the batch axis)."""
    out = dict(cache)
    for name, (b_ax, _) in cache_axes(cfg).items():
        out[name] = jnp.take(cache[name], rows, axis=b_ax)
    return out


@functools.partial(jax.jit, static_argnames=("scfg",))
def _prefix_block(params, pre, n_pre, g_ids, g_len, a_grp, a_ids, a_len, b_ids, b_len,
                  scfg: StaticCfg):
    """Stage G (group prefixes ``g_ids [G, LG]``; skipped when ``g_ids`` is None), stage A (own
    context tokens ``a_ids [B, LA]`` on the cache row of group ``a_grp``) and stage B
    (``b_ids [B, K, LB]``, one continuation per repeated cache row).  Returns per-token
    log-probs ``[B, K, LB]`` and greedy hits."""
    cfg = scfg.cfg
    B, LA = a_ids.shape
    _, K, LB = b_ids.shape
    P = 0 if pre is None else pre["seg"].shape[cache_axes(cfg)["seg"][1]]
    model = Decoder(cfg, scfg.run, scfg.lora)
    dt = scfg.run.dtype
    if g_ids is None:
        cache = _start_cache(cfg, pre, B, P + LA + LB, dt)
        start = jnp.zeros((B,), jnp.int32) + n_pre
    else:
        G, LG = g_ids.shape
        cache = _start_cache(cfg, pre, G, P + LG + LA + LB, dt)
        gr = jnp.arange(LG, dtype=jnp.int32)[None]
        g_seg = (gr < g_len[:, None]).astype(jnp.int32)
        _, cache = model.apply({"params": params}, g_ids, positions=(n_pre + gr) * g_seg,
                               segment_ids=g_seg, cache=cache, return_hidden=True)
        cache = _take_rows(cfg, cache, a_grp)
        start = n_pre + jnp.take(g_len, a_grp)
    ar = jnp.arange(LA, dtype=jnp.int32)[None]
    a_seg = (ar < a_len[:, None]).astype(jnp.int32)
    a_pos = (start[:, None] + ar) * a_seg
    h_a, cache = model.apply({"params": params}, a_ids, positions=a_pos, segment_ids=a_seg,
                             cache=cache, return_hidden=True)
    last = jnp.take_along_axis(h_a, jnp.maximum(a_len - 1, 0)[:, None, None], axis=1)  # [B,1,D]

    rep = lambda x, axis: jnp.repeat(x, K, axis=axis)  # noqa: E731
    cache = _repeat_rows(cfg, cache, K)
    ids = b_ids.reshape(B * K, LB)
    br = jnp.arange(LB, dtype=jnp.int32)[None]
    b_seg = (br < b_len.reshape(B * K, 1)).astype(jnp.int32)
    b_pos = (rep(start + a_len, 0)[:, None] + br) * b_seg
    h_b, _ = model.apply({"params": params}, ids, positions=b_pos, segment_ids=b_seg,
                         cache=cache, return_hidden=True)
    h = jnp.concatenate([rep(last, 0), h_b[:, :LB - 1]], axis=1)  # predicts ids[:, t]
    lp, hit = _token_logprobs(params, scfg, h, ids, b_seg.astype(bool))
    return lp.reshape(B, K, LB), hit.reshape(B, K, LB)


@functools.partial(jax.jit, static_argnames=("scfg",))
def _packed_block(params, ids, seg, pos, pred_idx, pred_tgt, pred_mask, scfg: StaticCfg):
    """One forward pass over packed rows; log-probs of the ``pred_tgt`` tokens predicted at
    positions ``pred_idx [B, M]``."""
    h = Decoder(scfg.cfg, scfg.run, scfg.lora).apply(
        {"params": params}, ids, positions=pos, segment_ids=seg, return_hidden=True)
    hs = jnp.take_along_axis(h, pred_idx[..., None], axis=1)
    return _token_logprobs(params, scfg, hs, pred_tgt, pred_mask)


# --------------------------------------------------------------------------------------------
# Host drivers
# --------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, desc, unit: str = "item"):
        self.bar = None
        if desc:
            self.bar = tqdm(total=total, desc=desc if isinstance(desc, str) else "loglik",
                            unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _placer(mesh):
    if mesh is None:
        return jnp.asarray
    return lambda x: jax.device_put(x, batch_sharding(mesh, ndim=np.ndim(x)))


@dataclasses.dataclass
class PrefixBatch:
    """One ``"prefix"`` batch: padded lengths (``lg = 0``: no group stage) and its groups, each
    ``(group prefix length, request indices)``."""
    lg: int
    la: int
    lb: int
    groups: List[Tuple[int, List[int]]]

    @property
    def requests(self) -> List[int]:
        return [i for _, idx in self.groups for i in idx]


@dataclasses.dataclass
class PrefixPlan:
    """How the ``"prefix"`` method will run a list of requests (no model needed): ``n_pre``
    tokens shared by all (padded to ``P`` slots), then ``batches`` of ``batch_rows`` request rows
    and ``group_rows`` group rows."""
    n_pre: int
    P: int
    K: int
    batch_rows: int
    group_rows: int
    batches: List[PrefixBatch]
    tokens_real: int

    @property
    def programs(self) -> int:
        """Distinct compiled block shapes."""
        return len({(b.lg, b.la, b.lb) for b in self.batches})

    @property
    def tokens_computed(self) -> int:
        return self.P + sum(self.group_rows * b.lg + self.batch_rows * (b.la + self.K * b.lb)
                            for b in self.batches)


def _common(a: Sequence[int], b: Sequence[int], n: int) -> int:
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_requests(own: Sequence[Sequence[int]], min_group_prefix: int, max_group: int
                   ) -> List[Tuple[int, List[int]]]:
    """Groups of requests whose own contexts share a prefix: ``[(prefix length, indices)]``.

    Contexts are sorted (so the BBQ items of one context paragraph are neighbours: the
    ambiguous context is a prefix of the disambiguated one), then consecutive contexts join a
    group while the group's common prefix stays at least ``min_group_prefix`` tokens (and
    leaves every member one own token) and the group has at most ``max_group`` members.  A
    request that joins no group is a group of its own with prefix length 0.  Deterministic.
    """
    order = sorted(range(len(own)), key=lambda i: (tuple(own[i]), i))
    groups: List[Tuple[int, List[int]]] = []
    cur: List[int] = []
    lcp = 0
    for i in order:
        if cur and len(cur) < max_group:
            n = _common(own[cur[0]], own[i], min(lcp, len(own[i]) - 1))
            if n >= min_group_prefix:
                cur.append(i)
                lcp = n
                continue
        if cur:
            groups.append((lcp if len(cur) > 1 else 0, cur))
        cur, lcp = [i], len(own[i]) - 1
    if cur:
        groups.append((lcp if len(cur) > 1 else 0, cur))
    return groups


def plan_prefix(requests: Sequence[Request], *, batch_rows: int = 8, length_bucket: int = 16,
                cont_bucket: int = 4, min_shared_prefix: int = 8, min_group_prefix: int = 16,
                max_group: int = 2, seq_len: int = 512, compile_cost_tokens: int = 2048,
                row_multiple: int = 1) -> PrefixPlan:
    """The batches of the ``"prefix"`` method (see :func:`score_requests` for the arguments)."""
    K = _check_requests(requests)
    ctxs = [r.context for r in requests]
    n_pre = shared_prefix_length(ctxs)
    if n_pre < min_shared_prefix:
        n_pre = 0
    P = round_up(n_pre, length_bucket, length_bucket) if n_pre else 0
    own = [c[n_pre:] for c in ctxs]
    max_group = max(1, min(max_group, batch_rows))
    if max_group > 1:
        groups = group_requests(own, min_group_prefix, max_group)
    else:
        groups = [(0, [i]) for i in range(len(requests))]
    sizes = [len(g) for _, g in groups]
    grouped = sum(n for n in sizes if n > 1) >= len(requests) / 2
    if not grouped:  # too little to share: one request per group, no group stage
        groups = [(0, [i]) for _, g in groups for i in g]
        sizes = [1] * len(groups)
    group_rows = max(1, min(batch_rows, int(batch_rows * len(groups) / len(requests) + 0.5)))
    group_rows = min(round_up(group_rows, row_multiple), batch_rows)  # rows split over shards
    b_len = [max(len(c) for c in r.continuations) for r in requests]
    shapes = []
    for lcp, idx in groups:
        lg = round_up(lcp, length_bucket, length_bucket) if grouped else 0
        la = round_up(max(len(own[i]) - lcp for i in idx), length_bucket, length_bucket)
        lb = round_up(max(b_len[i] for i in idx), cont_bucket, cont_bucket)
        if P + lg + la + lb > seq_len:
            i = max(idx, key=lambda j: len(ctxs[j]))
            r = requests[i]
            raise ValueError(f"{r.where or f'request {i}'}: {len(r.context)} context + "
                             f"{b_len[i]} continuation tokens exceed seq_len={seq_len}")
        shapes.append((lg, la, lb))
    mean = len(requests) / len(groups)
    final = merge_buckets(shapes, (1, mean, mean * K), compile_cost_tokens)
    shapes = [final[sh] for sh in shapes]
    order = sorted(range(len(groups)), key=lambda g: (shapes[g], g))
    batches: List[PrefixBatch] = []
    for g in order:
        b = batches[-1] if batches else None
        if (b is None or (b.lg, b.la, b.lb) != shapes[g] or len(b.groups) >= group_rows
                or len(b.requests) + sizes[g] > batch_rows):
            b = PrefixBatch(*shapes[g], [])
            batches.append(b)
        b.groups.append(groups[g])
    real = n_pre + sum(lcp for lcp, _ in groups) + sum(
        len(own[i]) - lcp for lcp, idx in groups for i in idx) + sum(
        len(c) for r in requests for c in r.continuations)
    return PrefixPlan(n_pre, P, K, batch_rows, group_rows if grouped else 0, batches, real)


def _score_prefix(scfg: StaticCfg, params, requests, K, *, batch_rows, pad_id, place, progress,
                  **plan_kw):
    plan = plan_prefix(requests, batch_rows=batch_rows, **plan_kw)
    N, n_pre, G = len(requests), plan.n_pre, plan.group_rows
    pre = None
    if n_pre:
        pids = np.full((1, plan.P), pad_id, np.int32)
        pids[0, :n_pre] = requests[0].context[:n_pre]
        pre = _prefix_state(params, jnp.asarray(pids), jnp.int32(n_pre), scfg)
    lp_sum = np.zeros((N, K), np.float64)
    greedy = np.zeros((N, K), bool)
    bar = _Progress(N, progress)
    try:
        for b in plan.batches:
            g_ids = g_len = a_grp = None
            if G:
                g_ids = np.full((G, b.lg), pad_id, np.int32)
                g_len = np.zeros((G,), np.int32)
                a_grp = np.zeros((batch_rows,), np.int32)
            a_ids = np.full((batch_rows, b.la), pad_id, np.int32)
            a_len = np.ones((batch_rows,), np.int32)  # filler rows: one padding token
            b_ids = np.full((batch_rows, K, b.lb), pad_id, np.int32)
            b_len = np.zeros((batch_rows, K), np.int32)
            rows = []
            for g, (lcp, idx) in enumerate(b.groups):
                if G:
                    g_ids[g, :lcp] = requests[idx[0]].context[n_pre:n_pre + lcp]
                    g_len[g] = lcp
                for i in idx:
                    r = len(rows)
                    rows.append(i)
                    own = requests[i].context[n_pre + lcp:]
                    a_ids[r, :len(own)] = own
                    a_len[r] = len(own)
                    if G:
                        a_grp[r] = g
                    for k, c in enumerate(requests[i].continuations):
                        b_ids[r, k, :len(c)] = c
                        b_len[r, k] = len(c)
            if G:
                g_ids, g_len, a_grp = place(g_ids), place(g_len), place(a_grp)
            lp, hit = _prefix_block(params, pre, jnp.int32(n_pre), g_ids, g_len, a_grp,
                                    place(a_ids), place(a_len), place(b_ids), place(b_len),
                                    scfg)
            lp = np.asarray(lp, np.float64)
            hit = np.asarray(hit)
            for r, i in enumerate(rows):
                lp_sum[i] = lp[r].sum(-1)
                greedy[i] = hit[r].all(-1)
            bar.update(len(rows))
    finally:
        bar.close()
    n_tok = np.array([[len(c) for c in r.continuations] for r in requests])
    return Scores(lp_sum, n_tok, greedy, "prefix", n_pre, plan.tokens_computed,
                  plan.tokens_real)


def _packed_sequences(requests, seq_len: int) -> List[Tuple[int, int, tuple, int]]:
    """``(request, k, context + continuation ids, n_context)`` of every continuation, longest
    first (tighter first-fit packing, and unpacked rows of similar length together)."""
    seqs = []
    for i, r in enumerate(requests):
        for k, c in enumerate(r.continuations):
            ids = tuple(r.context) + tuple(c)
            if len(ids) > seq_len:
                raise ValueError(f"{r.where or f'request {i}'}: {len(r.context)} context + "
                                 f"{len(c)} continuation tokens exceed seq_len={seq_len}")
            seqs.append((i, k, ids, len(r.context)))
    seqs.sort(key=lambda s: (-len(s[2]), s[0], s[1]))
    return seqs


def _packed_rows(seqs, *, seq_len, length_bucket, packed, compile_cost_tokens, max_open_rows
                 ) -> List[Tuple[int, List[Tuple[Any, dict]]]]:
    """``(row length, [(seqs index, example)])`` rows: first-fit packed into ``seq_len``, or one
    sequence per row with bucketed lengths (rare buckets merged), sorted by length."""
    def example(s):
        return {"input_ids": np.asarray(s[2], np.int32),
                "loss_mask": (np.arange(len(s[2])) >= s[3]).astype(np.int32)}
    if packed:
        packer = Packer(seq_len, "first_fit", max_open_rows)
        rows = [(seq_len, r) for j, s in enumerate(seqs) for r in packer.add(example(s), j)]
        return rows + [(seq_len, r) for r in packer.flush()]
    rows = [(round_up(len(s[2]), length_bucket, length_bucket), [(j, example(s))])
            for j, s in enumerate(seqs)]
    final = merge_buckets([(L,) for L, _ in rows], (1,), compile_cost_tokens)
    return sorted(((final[(L,)][0], r) for L, r in rows), key=lambda x: x[0])


def _packed_targets(batch, group, batch_rows: int, M: int, pad_id: int):
    """Per row the ``M`` scored positions: ``(index, target, mask, owning seqs index)``."""
    L = batch["inputs"].shape[1]
    owners = np.full((batch_rows, L), -1, np.int64)  # seqs index per target position
    for b, r in enumerate(group):
        seg = batch["segment_ids"][b]
        for s, (j, _) in enumerate(r, start=1):
            owners[b, seg == s] = j
    scored = batch["loss_mask"] > 0
    pred_idx = np.zeros((batch_rows, M), np.int32)
    pred_tgt = np.full((batch_rows, M), pad_id, np.int32)
    pred_mask = np.zeros((batch_rows, M), bool)
    pred_owner = np.full((batch_rows, M), -1, np.int64)
    for b in range(batch_rows):
        pos = np.nonzero(scored[b])[0]
        pred_idx[b, :len(pos)] = pos
        pred_tgt[b, :len(pos)] = batch["targets"][b, pos]
        pred_mask[b, :len(pos)] = True
        pred_owner[b, :len(pos)] = owners[b, pos]
    return pred_idx, pred_tgt, pred_mask, pred_owner


def _score_packed(scfg: StaticCfg, params, requests, K, *, batch_rows, seq_len, length_bucket,
                  packed, pad_id, place, progress, compile_cost_tokens, max_open_rows=64):
    N = len(requests)
    seqs = _packed_sequences(requests, seq_len)
    rows = _packed_rows(seqs, seq_len=seq_len, length_bucket=length_bucket, packed=packed,
                        compile_cost_tokens=compile_cost_tokens, max_open_rows=max_open_rows)
    # One gather width for the whole call: the most continuation tokens in any row.
    M = round_up(max(sum(len(seqs[j][2]) - seqs[j][3] for j, _ in r) for _, r in rows), 8, 8)
    lp_sum = np.zeros((N, K), np.float64)
    greedy = np.ones((N, K), bool)
    remaining = np.full(N, K)  # continuations not yet scored, for the items/s progress
    bar = _Progress(N, progress)
    computed = start = 0
    try:
        while start < len(rows):
            L = rows[start][0]
            group = []
            while start < len(rows) and len(group) < batch_rows and rows[start][0] == L:
                group.append(rows[start][1])
                start += 1
            built = [build_row([ex for _, ex in r], L, pad_id) for r in group]
            batch = stack_rows(built, L, batch_rows, pad_id=pad_id)
            idx, tgt, mask, owner = _packed_targets(batch, group, batch_rows, M, pad_id)
            lp, hit = _packed_block(params, place(batch["inputs"]), place(batch["segment_ids"]),
                                    place(batch["positions"]), place(idx), place(tgt),
                                    place(mask), scfg)
            lp, hit = np.asarray(lp, np.float64), np.asarray(hit)
            for j, v, h in zip(owner[mask], lp[mask], hit[mask]):
                i, k = seqs[j][0], seqs[j][1]
                lp_sum[i, k] += v
                greedy[i, k] &= bool(h)
            done = [seqs[j][0] for r in group for j, _ in r]
            np.subtract.at(remaining, done, 1)
            computed += batch_rows * L
            bar.update(int(sum(remaining[i] == 0 for i in set(done))))
    finally:
        bar.close()
    n_tok = np.array([[len(c) for c in r.continuations] for r in requests])
    real = sum(len(s[2]) for s in seqs)
    return Scores(lp_sum, n_tok, greedy, "packed" if packed else "unpacked", 0, computed, real)


def score_requests(model, requests: Sequence[Request], *, method: str = "prefix",
                   batch_rows: int = 8, seq_len: int = 512, length_bucket: int = 16,
                   cont_bucket: int = 4, min_shared_prefix: int = 8,
                   min_group_prefix: int = 16, max_group: int = 2,
                   compile_cost_tokens: int = 2048, pad_id: Optional[int] = None, mesh=None,
                   progress=None) -> Scores:
    """Score every request's continuations (see the module docstring for ``method``).

    ``model``: a :class:`regift_jax.models.ModelHandle` (its ``mesh``, ``run`` and ``lora`` are
    used) or a ``(cfg, params[, run[, lora]])`` tuple (default: float32, no LoRA).  ``seq_len``: the packed row length (``"packed"``) and, for every
    method, the longest ``context + continuation`` accepted (a longer request is an error naming
    it).  ``length_bucket`` / ``cont_bucket``: context / continuation lengths are padded to
    multiples of these; ``compile_cost_tokens``: rare shapes are folded into larger ones when
    that adds fewer padded tokens than this (:func:`merge_buckets`).  ``min_shared_prefix``,
    ``min_group_prefix``, ``max_group``: the ``"prefix"`` method's sharing levels (module
    docstring; ``max_group=1`` turns groups off).  ``progress``: a tqdm description (items/s
    bar) or ``None``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if isinstance(model, tuple):
        cfg, params, *rest = model
        scfg = StaticCfg(cfg, *rest)
    else:
        cfg, params = model.cfg, model.params
        scfg = StaticCfg(cfg, model.run, model.lora)
        mesh = mesh if mesh is not None else getattr(model, "mesh", None)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    K = _check_requests(requests)
    place = _placer(mesh)
    row_multiple = batch_shards(mesh)  # every batch's rows are split over the batch shards
    batch_rows = round_up(batch_rows, row_multiple)
    if method == "prefix":  # cached calls: the decoder's own attention, whatever attention_impl
        return _score_prefix(scfg, params, requests, K, batch_rows=batch_rows, pad_id=pad_id,
                             place=place, progress=progress, length_bucket=length_bucket,
                             cont_bucket=cont_bucket, min_shared_prefix=min_shared_prefix,
                             min_group_prefix=min_group_prefix, max_group=max_group,
                             seq_len=seq_len, compile_cost_tokens=compile_cost_tokens,
                             row_multiple=row_multiple)
    with trace_context(mesh, scfg.run, pin_activations=False):  # see trace_context
        return _score_packed(scfg, params, requests, K, batch_rows=batch_rows, seq_len=seq_len,
                             length_bucket=length_bucket, packed=method == "packed",
                             pad_id=pad_id, place=place, progress=progress,
                             compile_cost_tokens=compile_cost_tokens)


# --------------------------------------------------------------------------------------------
# BBQ
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class OptionScores:
    """BBQ continuation scores ``[N, K]`` with the three normalisations and their argmax: the
    three options (``request_format="template"``) or lm-eval's 12 choices (``"lm_eval"``)."""
    scores: Scores
    n_bytes: np.ndarray  # [N, K] UTF-8 bytes of each continuation's text
    prompts: List[str]
    continuations: List[Tuple[str, ...]]
    request_format: str = "template"

    @property
    def logprob_sum(self) -> np.ndarray:
        return self.scores.logprob_sum

    @property
    def logprob_mean(self) -> np.ndarray:
        return self.scores.logprob_mean

    @property
    def logprob_per_byte(self) -> np.ndarray:
        return self.scores.logprob_sum / np.maximum(self.n_bytes, 1)

    @property
    def prediction(self) -> np.ndarray:
        """lm-eval-harness ``acc``: argmax of the summed log-probability."""
        return np.argmax(self.logprob_sum, axis=1).astype(np.int32)

    @property
    def prediction_norm(self) -> np.ndarray:
        """lm-eval-harness ``acc_norm``: argmax of the per-byte normalised log-probability."""
        return np.argmax(self.logprob_per_byte, axis=1).astype(np.int32)

    @property
    def prediction_mean(self) -> np.ndarray:
        return np.argmax(self.logprob_mean, axis=1).astype(np.int32)


def _resolve_template(template):
    return prompts.get_template(template) if isinstance(template, str) else template


def use_chat(tokenizer, chat) -> bool:
    """``chat``: True / False, or ``"auto"``/``None`` = wrap when the tokenizer has a template."""
    if chat in (None, "auto"):
        return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))
    if isinstance(chat, str):
        if chat not in ("on", "off"):
            raise ValueError(f"chat must be auto, on or off, got {chat!r}")
        return chat == "on"
    return bool(chat)


def bbq_prompt(item, template, tokenizer=None, *, chat=False, system=None,
               include_prefill: bool = True) -> str:
    """The rendered prompt for one BBQ item (fields the template asks for: context, question,
    and for multiple-choice templates ans0..ans2)."""
    t = _resolve_template(template)
    values = {"context": item.context, "question": item.question,
              "ans0": item.options[0], "ans1": item.options[1], "ans2": item.options[2]}
    fields = {k: values[k] for k in t.required_fields}
    return prompts.render_for_model(t, tokenizer, chat=use_chat(tokenizer, chat), system=system,
                                    include_prefill=include_prefill, **fields)


def option_continuation(prompt: str, option: str, answer_format: str = "{option}") -> str:
    """The scored continuation text: ``answer_format`` with the option, preceded by one space
    when the prompt does not end in whitespace (``"Answer:"`` -> ``" The Muslim one"``)."""
    text = answer_format.replace("{option}", option)
    if prompt and not prompt[-1].isspace() and not text[:1].isspace():
        text = " " + text
    return text


def bbq_requests(items, template, tokenizer, *, chat="auto", system=None,
                 answer_format: str = "{option}", include_prefill: bool = False
                 ) -> Tuple[List[Request], List[str], List[Tuple[str, str, str]]]:
    """Requests (prompt ids, three option ids) for BBQ items, with the texts they came from.

    The prompt excludes the template's prefill by default (a ``<think>`` scaffold is not where
    an option would follow); pass ``include_prefill=True`` to keep it.  Prompt ids follow the
    one BOS/chat rule of :func:`regift_jax.core.prompts.encode_prompt` (the tokenizer's BOS in
    front when it adds one, as in training); the option continuations carry no special tokens.
    """
    if tokenizer is None:
        raise ValueError("BBQ log-likelihood scoring needs a tokenizer")
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    bos = prompts.bos_id(tokenizer)
    reqs, texts, conts = [], [], []
    for it in items:
        p = bbq_prompt(it, template, tokenizer, chat=chat, system=system,
                       include_prefill=include_prefill)
        cs = tuple(option_continuation(p, o, answer_format) for o in it.options)
        reqs.append(Request(tuple(prompts.with_bos(enc(p), bos)), tuple(enc(c) for c in cs),
                            it.source or f"{it.category} example_id {it.example_id}"))
        texts.append(p)
        conts.append(cs)  # type: ignore[arg-type]
    return reqs, texts, conts


#: lm-eval's ``target_delimiter`` (its default, which the bbq task keeps): between the prompt
#: and every choice.
LM_EVAL_TARGET_DELIMITER = " "


def lm_eval_prompt(item) -> str:
    """lm-eval's ``bbq`` prompt (the task's ``doc_to_text``) of one item."""
    return f"{item.context}\n\nQ: {item.question}\nA:"


def lm_eval_requests(items, tokenizer
                     ) -> Tuple[List[Request], List[str], List[Tuple[str, ...]]]:
    """lm-eval's ``bbq`` requests for BBQ items, tokenised as lm-eval does (module docstring):
    per item the prompt ids and the 12 choices' ids, with the texts they came from (each
    continuation text is the delimiter and the choice, as lm-eval logs them)."""
    if tokenizer is None:
        raise ValueError("BBQ log-likelihood scoring needs a tokenizer")
    # lm-eval's tok_encode: the tokenizer's default special tokens (its BOS when it adds one).
    enc = lambda s: tuple(tokenizer(s)["input_ids"])  # noqa: E731
    reqs, texts, conts = [], [], []
    for it in items:
        prompt = lm_eval_prompt(it)
        cs = tuple(LM_EVAL_TARGET_DELIMITER + c for c in lm_eval_doc(it).choices)
        context = prompt.rstrip()
        moved = prompt[len(context):]  # lm-eval scores trailing whitespace with the choice
        ctx = enc(context)
        ids = tuple(enc(context + moved + c)[len(ctx):] for c in cs)
        reqs.append(Request(ctx, ids, it.source or f"{it.category} example_id {it.example_id}"))
        texts.append(prompt)
        conts.append(cs)
    return reqs, texts, conts


def option_scores(handle, items, template="bbq_base", *, chat="auto", system=None,
                  answer_format: str = "{option}", include_prefill: bool = False,
                  request_format: str = "template",
                  shard: Optional[Tuple[int, int]] = None, **kw) -> OptionScores:
    """Score the continuations of every BBQ item (``kw`` go to :func:`score_requests`):
    ``request_format="template"``: the three options after ``template``'s prompt;
    ``"lm_eval"``: lm-eval's requests (:func:`lm_eval_requests`; ``template``, ``system``,
    ``answer_format`` and ``include_prefill`` do not apply, and ``chat`` must not be on, as
    lm-eval's task is not chat-wrapped).  ``shard=(start, stop)``: score
    ``items[start:stop]`` only (one process's share), after checking the requests of every
    item, so every process finds the same bad request."""
    if request_format not in FORMATS:
        raise ValueError(f"request_format must be one of {FORMATS}, got {request_format!r}")
    if request_format == "lm_eval":
        if chat is True or chat == "on":
            raise ValueError("lm-eval's bbq requests are not chat-wrapped: chat must be off "
                             "or auto with request_format='lm_eval'")
        reqs, texts, conts = lm_eval_requests(items, handle.tokenizer)
    else:
        reqs, texts, conts = bbq_requests(items, template, handle.tokenizer, chat=chat,
                                          system=system, answer_format=answer_format,
                                          include_prefill=include_prefill)
    _check_requests(reqs)
    a, b = shard or (0, len(reqs))
    sc = score_requests(handle, reqs[a:b], **kw)
    n_bytes = np.array([[len(c.encode("utf-8")) for c in cs] for cs in conts[a:b]])
    return OptionScores(sc, n_bytes, texts[a:b], conts[a:b], request_format)


def score_options(handle, items, template="bbq_base", *, batch_rows: int = 8,
                  seq_len: int = 512, **kw) -> np.ndarray:
    """``[N, 3]`` summed log-probabilities of each BBQ item's options (see
    :func:`option_scores` for the normalised variants and the predictions)."""
    return option_scores(handle, items, template, batch_rows=batch_rows, seq_len=seq_len,
                         **kw).logprob_sum


# --------------------------------------------------------------------------------------------
# StereoSet
# --------------------------------------------------------------------------------------------

def stereoset_requests(items, tokenizer, *, empty_context_ids: Optional[Sequence[int]] = None
                       ) -> List[Request]:
    """One request per StereoSet item, its three sentences (stereotype, anti-stereotype,
    unrelated) as continuations.  Intrasentence: the whole sentence after
    ``empty_context_ids`` (default ``[bos_token_id]``, as lm-eval-harness does for an empty
    context); intersentence: ``" " + sentence`` after the context."""
    if tokenizer is None:
        raise ValueError("StereoSet scoring needs a tokenizer")
    if empty_context_ids is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(tokenizer, "eos_token_id", None)
        if bos is None:
            raise ValueError("tokenizer has neither a BOS nor an EOS token: pass "
                             "empty_context_ids for intrasentence items")
        empty_context_ids = (int(bos),)
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pairs = scoring_requests(items)
    out = []
    for n, it in enumerate(items):
        trio = pairs[3 * n:3 * n + 3]
        ctx = enc(trio[0][0]) if trio[0][0] else tuple(empty_context_ids)
        out.append(Request(ctx, tuple(enc(c) for _, c in trio), it.source))
    return out


def stereoset_scores(handle, items, *, empty_context_ids=None, **kw) -> Scores:
    """Log-likelihoods ``[N, 3]`` of every StereoSet item's sentences (``kw`` go to
    :func:`score_requests`).  Feed ``.logprob_mean`` (the official per-token average; it does
    not favour short sentences) or ``.logprob_sum`` to
    :func:`regift_jax.eval.stereoset.stereoset_metrics`."""
    reqs = stereoset_requests(items, handle.tokenizer, empty_context_ids=empty_context_ids)
    return score_requests(handle, reqs, **kw)


__all__ = ["Request", "Scores", "OptionScores", "METHODS", "score_requests", "score_options",
           "option_scores", "bbq_requests", "lm_eval_requests", "lm_eval_prompt",
           "LM_EVAL_TARGET_DELIMITER", "FORMATS", "plan_prefix", "PrefixPlan", "PrefixBatch",
           "group_requests", "merge_buckets",
           "bbq_prompt", "option_continuation", "stereoset_requests", "stereoset_scores",
           "shared_prefix_length", "lm_head", "use_chat",
           "StaticCfg", "cache_axes"]
