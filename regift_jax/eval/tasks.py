"""The model tasks: a loaded model evaluated on BBQ (``loglik`` or ``generate`` mode) or StereoSet,
each returning its report dict.  Every option comes from the evaluation config
(:func:`regift_jax.eval.config.base_config`).

* ``generate``: the shared sampler answers every item (:mod:`regift_jax.eval.generate`; greedy,
  per-template stop strings and token limits); the answers are judged by
  :func:`regift_jax.eval.bbq.judge_items`, exactly like imported generations, and returned in
  ``report["generations"]`` (the ``--generations`` JSONL schema).  ``bbq_cot`` answers "The answer
  is (X)": its letter is read first (``span_source = "answer_letter"``), the text parsers
  otherwise.
* ``loglik``: multiple choice by log-likelihood (:mod:`regift_jax.eval.loglik`): the option with
  the largest summed log-probability after the prompt is the prediction (lm-eval-harness
  ``acc``); ``report["loglik"]`` adds the metrics of the per-byte (``acc_norm``) and per-token
  normalised choices, and every item lists its three scores.  ``loglik.format=lm_eval`` scores
  lm-eval's ``bbq`` requests instead (its prompt and 12 choices,
  :func:`regift_jax.eval.loglik.lm_eval_requests`): the choice maps to the BBQ option it stands
  for, so every metric above applies, and ``report["lm_eval"]["metrics"]`` holds lm-eval's own
  metrics (its targets and biased answers), equal to an lm-eval run of the ``bbq`` task with the
  ``regift_jax`` backend on the same items.
* ``stereoset``: StereoSet LM / stereotype / ICAT scores from per-sentence log-likelihoods.

With several processes (:mod:`regift_jax.eval.hosts`) each one scores a contiguous share of the
items and the per-item results are gathered before anything is aggregated, so every process
builds the report of all items.  Every BBQ record carries its ``context_group``
(:func:`regift_jax.eval.subset.context_groups`), the cluster of the bootstrap; a generate-mode
report counts the generations cut off by the token budget (``report["cut_off"]``).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from regift_jax.core import prompts as prompts_lib
from regift_jax.data.bbq import BBQItem
from regift_jax.eval import generate as gen_lib
from regift_jax.eval import hosts, loglik
from regift_jax.eval import stereoset as ss
from regift_jax.eval.bbq import judge_items, loglik_records
from regift_jax.eval.config import InputError
from regift_jax.eval.report import build_report, cut_off_summary, lm_eval_metrics
from regift_jax.eval.subset import add_context_groups

_LOGLIK_NORMALISATION = (
    "prediction = argmax of the summed option log-probability (lm-eval-harness acc); "
    "metrics_acc_norm: argmax of sum / UTF-8 bytes of the option text (acc_norm); "
    "metrics_token_mean: argmax of the per-token mean")


def _generate(handle, flat: Sequence[BBQItem], t, wrap: bool, cfg
              ) -> Tuple[List[dict], Dict[str, object], Dict[str, object]]:
    """``(records, report extras, settings)`` of the generate mode; this process generates its
    share of ``flat`` (:mod:`regift_jax.eval.hosts`), the shares are gathered."""
    g = cfg.generate
    letters = "ans0" in t.required_fields
    a, b = hosts.share(len(flat))

    def work():
        gens = gen_lib.generate_records(
            handle, flat, t, chat=wrap, system=cfg.prompt.system,
            max_new_tokens=g.max_new_tokens, max_total_tokens=g.max_total_tokens,
            stop_strings=g.stop, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
            seed=g.seed, batch_size=cfg.runtime.batch_size, score_prefill=g.score_prefill,
            shard=(a, b), progress="generate" if cfg.runtime.progress else None)
        mine = flat[a:b]
        records = judge_items([(it, x.text) for it, x in zip(mine, gens)],
                              tie_break=cfg.judge.tie_break,
                              overlap_threshold=cfg.judge.overlap_threshold,
                              letter_options=letters)
        for r, x in zip(records, gens):
            r.update(finish_reason=x.finish_reason, generated_tokens=x.generated_tokens,
                     prompt_tokens=x.prompt_tokens)
        rows = [{"example_id": it.example_id, "category": it.category,
                 "context_condition": it.context_condition, "generation": x.text,
                 "finish_reason": x.finish_reason, "generated_tokens": x.generated_tokens}
                for it, x in zip(mine, gens)]
        return records, rows

    parts = hosts.gather_or_raise(work)
    records = [r for p in parts for r in p[0]]
    rows = [r for p in parts for r in p[1]]
    budget = gen_lib.sampling_settings(t, g.max_new_tokens, g.stop, g.max_total_tokens)
    settings = dict(budget, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                    sample_seed=g.seed, score_prefill=g.score_prefill,
                    tie_break=cfg.judge.tie_break, overlap_threshold=cfg.judge.overlap_threshold,
                    letter_options=letters)
    extra = {"generations": rows,
             "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in rows)),
             "cut_off": cut_off_summary(records, budget)}
    return records, extra, settings


def _alt_metrics(records, categories, key: str, cfg) -> Dict[str, object]:
    """Point metrics (no bootstrap) with ``option_index`` replaced by ``record[key]``."""
    alt = [dict(r, option_index=int(r[key])) for r in records]
    return build_report(alt, categories, num_resamples=0, seed=cfg.report.seed,
                        confidence=cfg.report.confidence)["metrics"]


def _loglik(handle, flat: Sequence[BBQItem], categories, t, wrap: bool, cfg,
            loglik_options: Optional[Mapping[str, object]]
            ) -> Tuple[List[dict], Dict[str, object], Dict[str, object]]:
    """``(records, report extras, settings)`` of the loglik mode."""
    m = cfg.loglik
    a, b = hosts.share(len(flat))

    def work():
        if a >= b:
            return [], [0, 0, 0]
        sc = loglik.option_scores(handle, flat, t, chat=wrap, system=cfg.prompt.system,
                                  answer_format=m.answer_format, request_format=m.format,
                                  method=m.method,
                                  batch_rows=cfg.runtime.batch_size, seq_len=m.seq_len,
                                  shard=(a, b),
                                  progress="loglik" if cfg.runtime.progress else None,
                                  **dict(loglik_options or {}))
        s = sc.scores
        return (loglik_records(flat[a:b], sc),
                [s.shared_prefix_tokens, s.tokens_real, s.tokens_computed])

    parts = hosts.gather_or_raise(work)
    records = [r for p in parts for r in p[0]]
    shared, real, computed = (sum(p[1][i] for p in parts) for i in range(3))
    settings = {"loglik_method": m.method, "seq_len": m.seq_len, "loglik_format": m.format}
    if m.format == "template":
        settings["answer_format"] = m.answer_format
    extra = {"loglik": {
        "normalisation": _LOGLIK_NORMALISATION,
        # summed over the processes (each shares prefixes within its own share)
        "shared_prefix_tokens": shared,
        "tokens_real": real,
        "tokens_computed": computed,
        "metrics_acc_norm": _alt_metrics(records, categories, "prediction_norm", cfg),
        "metrics_token_mean": _alt_metrics(records, categories, "prediction_mean", cfg),
    }}
    if m.format == "lm_eval":
        extra["lm_eval"] = {"task": "bbq (lm-eval 0.4.13, multiple choice)",
                            "metrics": lm_eval_metrics(records)}
    return records, extra, settings


def _loglik_note(extra: Mapping[str, object]) -> str:
    tot = lambda m: m["total"]["acc_overall"]  # noqa: E731
    ll = extra["loglik"]
    note = ("loglik mode: the prediction is the option with the largest summed log-probability "
            "(lm-eval-harness acc); it is never unparseable, and the paper exact match reads "
            f"the chosen option's text.  Overall accuracy with per-byte normalisation "
            f"(acc_norm): {100 * tot(ll['metrics_acc_norm']):.2f}%, with the "
            f"per-token mean: {100 * tot(ll['metrics_token_mean']):.2f}%")
    if "lm_eval" in extra:
        note += ("; lm-eval's bbq requests (12 choices, every unknown phrasing standing for the "
                 "unknown option): report['lm_eval'] has lm-eval's metrics, whose bias scores "
                 "use its biased answers and its empty-group rules")
    return note


def evaluate_model(handle, items: Mapping[str, Sequence[BBQItem]], cfg, *,
                   settings: Optional[Mapping[str, object]] = None,
                   loglik_options: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """Evaluate a loaded model on BBQ items (``{category: [BBQItem]}``, e.g. from
    :func:`regift_jax.eval.subset.select_subset`) in ``cfg.mode`` ``"loglik"`` or
    ``"generate"``; returns the report dict (write it with
    :func:`regift_jax.eval.report.write_all`).  ``settings`` are recorded in the report;
    ``loglik_options``: further keyword arguments of :func:`regift_jax.eval.loglik.score_requests`
    (``length_bucket``, ``compile_cost_tokens``, ...)."""
    categories = [c for c in items if items[c]]
    flat = [it for c in categories for it in items[c]]
    if not flat:
        raise InputError("no BBQ items to evaluate")
    t = prompts_lib.get_template(cfg.prompt.template)
    wrap = loglik.use_chat(handle.tokenizer, cfg.prompt.chat)
    template_id = t.id
    if cfg.mode == "loglik" and cfg.loglik.format == "lm_eval":
        # lm-eval's own prompt, never chat-wrapped: the template and chat settings do not apply
        if cfg.prompt.chat == "on":
            raise InputError("loglik.format=lm_eval scores lm-eval's bbq requests, which are "
                             "not chat-wrapped: use --chat=off or auto")
        wrap, template_id = False, "lm_eval:bbq"
    st = {"model": getattr(handle, "source", ""), "mode": cfg.mode, "template": template_id,
          "chat": wrap, "system": cfg.prompt.system, "batch_size": cfg.runtime.batch_size,
          "n_items": len(flat), "n_items_by_category": {c: len(items[c]) for c in categories},
          "processes": jax.process_count(),
          **dict(settings or {})}
    t0 = time.perf_counter()
    if cfg.mode == "generate":
        records, extra, more = _generate(handle, flat, t, wrap, cfg)
    elif cfg.mode == "loglik":
        records, extra, more = _loglik(handle, flat, categories, t, wrap, cfg, loglik_options)
    else:
        raise InputError(f"--mode must be loglik or generate for BBQ, got {cfg.mode!r}")
    elapsed = time.perf_counter() - t0
    add_context_groups(records, flat)
    st.update(more, seconds=round(elapsed, 3), items_per_second=round(len(flat) / elapsed, 4))
    rep = build_report(records, categories, num_resamples=cfg.report.bootstrap_resamples,
                       seed=cfg.report.seed, confidence=cfg.report.confidence, settings=st,
                       title=cfg.report.title or
                       f"BBQ {cfg.mode} {template_id}: {os.path.basename(st['model'])}")
    if cfg.mode == "loglik":
        rep["notes"].append(_loglik_note(extra))
    rep.update(extra)
    return rep


# --------------------------------------------------------------------------------------------
# StereoSet
# --------------------------------------------------------------------------------------------

def _stereoset_path(cfg) -> str:
    path = cfg.data.stereoset_file or ss.default_stereoset_file()
    if not path or not os.path.exists(path):
        raise InputError(f"{path or 'no data root'}: StereoSet file not found (use "
                         f"--stereoset_file)")
    return path


def stereoset_items(cfg) -> List[ss.StereoSetItem]:
    """The StereoSet items of ``cfg.data`` (file, splits, ``max_items``: every k-th item, so
    the subset is deterministic and balanced over the splits)."""
    splits = [x.strip() for x in cfg.data.stereoset_splits.split(",") if x.strip()]
    items = ss.load_stereoset(_stereoset_path(cfg), tuple(splits or ss.SPLITS))
    cap = cfg.data.max_items
    if cap is not None and cap < len(items):
        step = len(items) / cap
        items = [items[int(i * step)] for i in range(cap)]
    return items


def stereoset_report(handle, cfg, *, items: Optional[Sequence[ss.StereoSetItem]] = None,
                     loglik_options: Optional[Mapping[str, object]] = None
                     ) -> Dict[str, object]:
    """StereoSet metrics from log-likelihoods: ``metrics`` uses the per-token mean (the
    official choice), ``metrics_sum`` the summed log-probability.  ``items``: default
    :func:`stereoset_items`."""
    path = _stereoset_path(cfg)
    items = list(stereoset_items(cfg) if items is None else items)
    t0 = time.perf_counter()
    a, b = hosts.share(len(items))

    def work():
        if a >= b:
            return [], []
        sc = loglik.stereoset_scores(handle, items[a:b], method=cfg.loglik.method,
                                     batch_rows=cfg.runtime.batch_size,
                                     seq_len=cfg.loglik.seq_len,
                                     progress="stereoset" if cfg.runtime.progress else None,
                                     **dict(loglik_options or {}))
        return sc.logprob_sum.tolist(), sc.n_tokens.tolist()

    parts = hosts.gather_or_raise(work)
    logprob_sum = np.array([x for p in parts for x in p[0]], np.float64)
    n_tokens = np.array([x for p in parts for x in p[1]], np.int64)
    logprob_mean = logprob_sum / np.maximum(n_tokens, 1)
    elapsed = time.perf_counter() - t0
    return {
        "schema": ss.REPORT_SCHEMA,
        "settings": {"model": getattr(handle, "source", ""), "file": os.path.abspath(path),
                     "n_items": len(items), "loglik_method": cfg.loglik.method,
                     "batch_size": cfg.runtime.batch_size, "seconds": round(elapsed, 3),
                     "items_per_second": round(len(items) / elapsed, 4)},
        "notes": ["scores: log-likelihood of each sentence; intrasentence after the BOS token, "
                  "intersentence after the context",
                  "metrics: per-token mean log-probability (official); metrics_sum: sums"],
        "metrics": ss.stereoset_metrics(items, logprob_mean),
        "metrics_sum": ss.stereoset_metrics(items, logprob_sum),
        "items": [{"source": it.source, "split": it.split, "target": it.target,
                   "bias_type": it.bias_type,
                   "logprob_sum": [float(x) for x in logprob_sum[n]],
                   "n_tokens": [int(x) for x in n_tokens[n]]}
                  for n, it in enumerate(items)],
    }
