"""BBQ reports: the report dict, report.json, a Markdown summary, PNG plots.

:func:`build_report` turns per-item records (:func:`regift_jax.eval.bbq.judge_items` /
:func:`~regift_jax.eval.bbq.loglik_records`) into the report dict: ``report["metrics"]`` is the
nested dict of the jitted :func:`regift_jax.eval.scorer.score` (``{category | "total": {metric,
"ci"}}``), ``report["categories"]`` the category order.  Everything else here is presentation
(no metric is computed outside the scorer); files are written atomically
(:func:`regift_jax.core.io.atomic_write`).

* :func:`to_jsonable` turns NaN / inf into ``null`` and numpy scalars into Python numbers, so
  report.json is strict JSON.
* :func:`markdown_report`: first the paper's layout (Age / Religion / Nationality x Ambig /
  Disambig / Overall, one row per judgement: standard accuracy, paper-compatible exact match,
  unparseable rate), then the BBQ bias scores, then every category with intervals.  Accuracies
  and rates are percentages; bias scores are x100 (range -100 .. 100, as in Parrish et al.).
* :func:`plot_report`: accuracy (ambig / disambig / overall with the overall's interval) and bias
  scores (s_DIS, s_AMB with intervals) per category.  :func:`plot_comparison` and
  :func:`comparison_markdown`: two reports side by side (e.g. before / after fine-tuning).
  Plots are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas; no display and no pyplot
  state needed).
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from regift_jax.core.io import atomic_write, atomic_write_text
from regift_jax.eval import scorer
from regift_jax.eval.bbq import PAPER_CATEGORIES, UNPARSEABLE
from regift_jax.eval.config import InputError

REPORT_SCHEMA = "regift_jax.bbq_report/1"
TOTAL = "total"
_NOTES = (
    "standard = answer span mapped to an option (regift_jax.eval.bbq); unparseable answers count "
    "as wrong and are reported separately",
    "paper exact match = the ReGiFT authors' static string scorer (no LLM judges)",
    "bias scores use a biased option derived from answer_info and stereotyped_groups, an "
    "approximation of BBQ's target_loc (additional_metadata.csv unavailable offline)",
    "reasoning length = whitespace words before </think>",
)
_CONDS = (("ambig", "Ambig"), ("disambig", "Disambig"), ("overall", "Overall"))


def _cluster_key(r: Mapping[str, object]):
    """The bootstrap cluster of a record: its BBQ context group, else the item alone."""
    group = r.get("context_group")
    return (r["category"], group if group is not None else f"item {r['example_id']}")


def bootstrap_unit(records: Sequence[Mapping[str, object]]) -> str:
    """What the bootstrap resamples for these records."""
    if records and all(r.get("context_group") is not None for r in records):
        return "context groups (the BBQ items sharing a context paragraph)"
    return "items"


def record_arrays(records: Sequence[Mapping[str, object]], categories: Sequence[str]
                  ) -> Dict[str, np.ndarray]:
    """The scorer's per-item arrays of the records (``cluster``: their context groups)."""
    cat_id = {c: i for i, c in enumerate(categories)}
    col = lambda key, dtype: np.array([r[key] for r in records], dtype)  # noqa: E731
    return {
        "prediction": col("option_index", np.int32), "label": col("label", np.int32),
        "unknown_option": col("unknown_option", np.int32),
        "biased_option": col("biased_option", np.int32),
        "condition": np.array([0 if r["context_condition"] == "ambig" else 1 for r in records],
                              np.int32),
        "category_id": np.array([cat_id[r["category"]] for r in records], np.int32),
        "paper_correct": np.array([bool(r["paper_exact_match"]) for r in records]),
        "valid": np.ones(len(records), bool),
        "reasoning_length": col("reasoning_length_words", np.float32),
        "cluster": [_cluster_key(r) for r in records],
    }


def build_report(records: Sequence[Mapping[str, object]], categories: Sequence[str], *,
                 num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                 settings: Optional[Mapping[str, object]] = None,
                 input_counts: Optional[Mapping[str, object]] = None,
                 title: str = "BBQ evaluation") -> Dict[str, object]:
    """Per-item records -> report dict (metrics via the jitted scorer)."""
    if not records:
        raise InputError("no BBQ item has a generation: nothing to score")
    metrics = scorer.score(record_arrays(records, categories), categories,
                           num_resamples=num_resamples, seed=seed, confidence=confidence)
    parse = {
        "span_sources": dict(collections.Counter(str(r["span_source"]) for r in records)),
        "n_unparseable": int(sum(r["option_index"] == UNPARSEABLE for r in records)),
        "n_multi_option_ties": int(sum(bool(r["tie"]) for r in records)),
    }
    return {
        "schema": REPORT_SCHEMA,
        "title": title,
        "categories": list(categories),
        "metrics": metrics,
        "bootstrap": scorer.bootstrap_settings(num_resamples, seed, confidence,
                                               bootstrap_unit(records)),
        "settings": dict(settings or {}),
        "input": dict(input_counts or {}),
        "parse": parse,
        "notes": list(_NOTES),
        "items": list(records),
    }


def lm_eval_metrics(records: Sequence[Mapping[str, object]]) -> Dict[str, float]:
    """lm-eval's ``bbq`` results (:func:`regift_jax.eval.scorer.lm_eval_metrics`) of records
    scored with lm-eval's requests (``loglik.format=lm_eval``: their ``lm_eval_*`` fields)."""
    col = lambda key: [float(r[key]) for r in records]  # noqa: E731
    return scorer.lm_eval_metrics(
        col("lm_eval_acc"), col("lm_eval_biased"), col("lm_eval_non_unknown"),
        [r["context_condition"] == "disambig" for r in records],
        [r["category"] for r in records])


def _lm_eval_lines(report: Mapping) -> List[str]:
    """The lm-eval section of report.md (reports with ``report["lm_eval"]``)."""
    m = (report.get("lm_eval") or {}).get("metrics")
    if not m:
        return []
    return ["", "## lm-eval bbq metrics (fractions; its requests, targets and bias rules)", "",
            "| acc | accuracy_amb | accuracy_disamb | amb_bias_score | disamb_bias_score |",
            "|---|---|---|---|---|",
            "| " + " | ".join(_pct(m.get(k), 1.0, 4) for k in (
                "acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score",
                "disamb_bias_score")) + " |"]


def _read_static_results(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["static"]["results"]
    except FileNotFoundError:
        raise InputError(f"{path}: reference file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not an evaluation_stats.json with static.results ({e})"
                         ) from None


def reference_agreement(records: Sequence[Mapping[str, object]], path: str
                        ) -> Dict[str, object]:
    """Compare the paper-compatible judgements with the authors' ``evaluation_stats.json``."""
    ref = _read_static_results(path)
    ours = {int(r["example_id"]): r for r in records}
    n = same_correct = same_pred = same_reason = 0
    disagree, missing = [], []
    ref_correct = 0
    for r in ref:
        eid = int(r["example_id"])
        ref_correct += bool(r["correct"])
        if eid not in ours:
            missing.append(eid)
            continue
        o = ours[eid]
        n += 1
        ok = bool(r["correct"]) == bool(o["paper_exact_match"])
        same_correct += ok
        same_pred += r.get("prediction") == o["paper_answer_text"]
        same_reason += r.get("reason") == o["paper_reason"]
        if not ok:
            disagree.append(eid)
    nan = float("nan")
    return {
        "file": path,
        "n_reference": len(ref),
        "n_compared": n,
        "n_reference_items_not_scored": len(missing),
        "correct_agreement": same_correct / n if n else nan,
        "prediction_text_agreement": same_pred / n if n else nan,
        "reason_agreement": same_reason / n if n else nan,
        "reference_static_accuracy": ref_correct / len(ref) if ref else nan,
        "disagreeing_example_ids": disagree[:100],
    }


def read_report(path: str) -> Dict[str, object]:
    """An earlier report.json (``report.compare``); an unreadable one is an InputError."""
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
        rep["metrics"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a readable report.json ({e})") from None
    return rep


def to_jsonable(obj):
    """Recursively convert to strict-JSON types (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def write_json(path: str, obj) -> None:
    """Strict JSON (:func:`to_jsonable`), written atomically."""
    data = to_jsonable(obj)
    atomic_write(path, lambda f: (json.dump(data, f, indent=1, allow_nan=False), f.write("\n")))


def _save(fig: Figure, path: str) -> str:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    return path


def _num(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pct(x, scale: float = 100.0, digits: int = 2) -> str:
    v = _num(x)
    return "—" if v is None else f"{scale * v:.{digits}f}"


def _ci(m: Mapping, name: str, scale: float = 100.0, digits: int = 1) -> str:
    ci = m.get("ci", {}).get(name)
    if not ci or _num(ci[0]) is None or _num(ci[1]) is None:
        return ""
    return f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def _rows(report: Mapping) -> List[str]:
    cats = list(report.get("categories") or [k for k in report["metrics"] if k != TOTAL])
    return cats


def cut_off_summary(records: Sequence[Mapping[str, object]], budget: Mapping[str, object]
                    ) -> Dict[str, object]:
    """``report["cut_off"]``: the generations that the token budget ended (finish_reason
    ``length``), in total and per category, with the budget."""
    cut = [r for r in records if r.get("finish_reason") == "length"]
    by_cat = collections.Counter(str(r["category"]) for r in cut)
    return {"n_cut_off": len(cut), "n_items": len(records),
            "rate": len(cut) / len(records) if records else float("nan"),
            "by_category": {c: by_cat.get(c, 0) for c in dict.fromkeys(
                str(r["category"]) for r in records)},
            **{k: budget.get(k) for k in ("max_new_tokens", "max_total_tokens")}}


def cut_off_line(report: Mapping) -> Optional[str]:
    """One line on the generations the token budget cut off (None without generations)."""
    c = report.get("cut_off")
    if not c:
        return None
    budget = ", ".join(f"{k}={c[k]}" for k in ("max_new_tokens", "max_total_tokens")
                       if c.get(k) is not None)
    return (f"cut off by the token budget ({budget}): {c['n_cut_off']} of {c['n_items']} "
            f"generations ({_pct(c['rate'], digits=1)}%)")


def markdown_report(report: Mapping, title: Optional[str] = None) -> str:
    metrics = report["metrics"]
    cats = _rows(report)
    lines = [f"# {title or report.get('title') or 'BBQ evaluation'}", ""]
    if cut_off_line(report):
        lines += [f"Generations {cut_off_line(report)}.", ""]
    paper_cats = [c for c in PAPER_CATEGORIES if c in cats] or cats
    lines += ["## Paper layout (accuracy, %)", ""]
    head = ["Judgement"] + [f"{c} {lab}" for c in paper_cats for _, lab in _CONDS]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, prefix in (("standard", "acc_"), ("paper exact match", "paper_acc_"),
                          ("unparseable", "unparseable_rate_")):
        cells = [_pct(metrics[c].get(prefix + k)) for c in paper_cats for k, _ in _CONDS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Bias scores (x100; Parrish et al., 2022)", "",
              "| Category | s_DIS [95% CI] | s_AMB [95% CI] | non-unknown answers "
              "(ambig / disambig) | biased option underivable |", "|---|---|---|---|---|"]
    for c in cats + [TOTAL]:
        m = metrics[c]
        lines.append(f"| {c} | {_pct(m.get('s_dis'), digits=1)}{_ci(m, 's_dis')} | "
                     f"{_pct(m.get('s_amb'), digits=1)}{_ci(m, 's_amb')} | "
                     f"{m.get('n_non_unknown_ambig')} / {m.get('n_non_unknown_disambig')} | "
                     f"{m.get('n_bias_underivable')} |")
    lines += ["", "## All categories (%, 95% bootstrap CI on overall)", "",
              "| Category | n (ambig / disambig) | Acc ambig | Acc disambig | Acc overall | "
              "Paper EM overall | Unparseable | Reasoning length correct / incorrect |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cats + [TOTAL]:
        m = metrics[c]
        lines.append(
            f"| {c} | {m.get('n_ambig')} / {m.get('n_disambig')} | {_pct(m.get('acc_ambig'))} | "
            f"{_pct(m.get('acc_disambig'))} | {_pct(m.get('acc_overall'))}"
            f"{_ci(m, 'acc_overall')} | {_pct(m.get('paper_acc_overall'))}"
            f"{_ci(m, 'paper_acc_overall')} | {_pct(m.get('unparseable_rate_overall'))} | "
            f"{_pct(m.get('mean_reasoning_length_correct'), 1.0, 1)} / "
            f"{_pct(m.get('mean_reasoning_length_incorrect'), 1.0, 1)} |")
    lines += _lm_eval_lines(report)
    notes = list(report.get("notes", []))
    boot = report.get("bootstrap") or {}
    if boot.get("resamples"):
        notes.append(f"Intervals: {boot['method']}, {boot['resamples']} resamples")
    counts = report.get("input", {})
    if counts:
        notes.append("Input: " + ", ".join(f"{k} = {v}" for k, v in counts.items()
                                           if not isinstance(v, (list, dict))))
    parse = report.get("parse", {})
    if parse:
        notes.append("Parsing: " + ", ".join(
            f"{k} = {json.dumps(to_jsonable(v))}" for k, v in parse.items()))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def comparison_markdown(before: Mapping, after: Mapping,
                        labels: Sequence[str] = ("before", "after")) -> str:
    """Side-by-side table of the headline metrics of two reports (shared categories)."""
    cats = [c for c in _rows(before) if c in after["metrics"]] + [TOTAL]
    cols = [("acc_ambig", "Acc ambig"), ("acc_disambig", "Acc disambig"),
            ("acc_overall", "Acc overall"), ("paper_acc_overall", "Paper EM"),
            ("unparseable_rate_overall", "Unparseable"), ("s_dis", "s_DIS"), ("s_amb", "s_AMB")]
    test = (after.get("comparison") or {}).get("metrics", {})
    lines = [f"# BBQ: {labels[0]} vs {labels[1]} (%, bias x100)", "",
             "| Category | " + " | ".join(f"{h} ({labels[0]} → {labels[1]})" for _, h in cols)
             + " |", "|---|" + "---|" * len(cols)]
    for c in cats:
        b, a = before["metrics"][c], after["metrics"][c]
        cells = [f"{_pct(b.get(k), digits=1)} → {_pct(a.get(k), digits=1)}"
                 + _change(test.get(c, {}).get(k)) for k, _ in cols]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if test:
        lines += ["", comparison_note(after["comparison"])]
    return "\n".join(lines) + "\n"


def _change(t: Optional[Mapping]) -> str:
    """`` (+1.2, p=0.03)``: a change and its paired p-value (x100), or nothing."""
    if not t or _num(t.get("diff")) is None:
        return ""
    p = _num(t.get("p_value"))
    return f" ({100 * t['diff']:+.1f}, p={'—' if p is None else f'{p:.2f}'})"


def comparison_note(comparison: Mapping) -> str:
    """What the p-values next to the changes are, and the McNemar test of the total."""
    mc = comparison.get("mcnemar", {}).get(TOTAL)
    text = (f"Changes (after - before) and p-values: {comparison['method']}; "
            f"{comparison['n_paired']} paired items, {comparison['resamples']} resamples over "
            f"{comparison['unit']}; p >= {1 - comparison['confidence']:.2f}: inside the noise.")
    if mc:
        text += (f" McNemar on per-item correctness (total): {mc['n_improved']} items wrong -> "
                 f"right, {mc['n_worsened']} right -> wrong, p={mc['p_value']:.2f}.")
    return text


def _vals(metrics: Mapping, cats: Sequence[str], name: str) -> np.ndarray:
    return np.array([_num(metrics[c].get(name)) if _num(metrics[c].get(name)) is not None
                     else np.nan for c in cats], dtype=float)


def _errs(metrics: Mapping, cats: Sequence[str], name: str) -> Optional[np.ndarray]:
    """Asymmetric error bars ``[2, n]`` from the CIs; zero where missing."""
    val = _vals(metrics, cats, name)
    lo, hi = np.zeros_like(val), np.zeros_like(val)
    found = False
    for i, c in enumerate(cats):
        ci = metrics[c].get("ci", {}).get(name)
        if ci and _num(ci[0]) is not None and _num(ci[1]) is not None and np.isfinite(val[i]):
            lo[i], hi[i] = max(val[i] - ci[0], 0.0), max(ci[1] - val[i], 0.0)
            found = True
    return np.stack([lo, hi]) if found else None


def plot_report(report: Mapping, path: str, title: Optional[str] = None) -> str:
    """Accuracy and bias score per category (plus the total) into one PNG."""
    metrics = report["metrics"]
    cats = _rows(report) + [TOTAL]
    x = np.arange(len(cats))
    fig = Figure(figsize=(max(8, 2.2 * len(cats)), 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    width = 0.27
    for j, (k, lab) in enumerate(_CONDS):
        err = _errs(metrics, cats, f"acc_{k}")
        e = None if err is None else 100 * err
        ax1.bar(x + (j - 1) * width, 100 * _vals(metrics, cats, f"acc_{k}"), width, yerr=e,
                capsize=3, label=lab)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title("Accuracy (standard judgement)")
    for j, (k, lab) in enumerate((("s_dis", "s_DIS"), ("s_amb", "s_AMB"))):
        err = _errs(metrics, cats, k)
        ax2.bar(x + (j - 0.5) * 0.38, 100 * _vals(metrics, cats, k), 0.38,
                yerr=None if err is None else 100 * err, capsize=3, label=lab)
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set_ylim(-105, 105)
    ax2.set_ylabel("bias score (x100)")
    ax2.set_title("BBQ bias scores")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(cats, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle(title or report.get("title") or "BBQ")
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(before: Mapping, after: Mapping, path: str,
                    labels: Sequence[str] = ("before", "after")) -> str:
    """Overall accuracy, s_DIS and s_AMB per shared category for two reports."""
    cats = [c for c in _rows(before) if c in after["metrics"]] + [TOTAL]
    x = np.arange(len(cats))
    panels = (("acc_overall", "accuracy overall (%)"), ("s_dis", "s_DIS (x100)"),
              ("s_amb", "s_AMB (x100)"))
    fig = Figure(figsize=(max(10, 3 * len(cats)), 4.2))
    axes = fig.subplots(1, 3)
    for ax, (name, ylabel) in zip(axes, panels):
        for j, (rep, lab) in enumerate(zip((before, after), labels)):
            err = _errs(rep["metrics"], cats, name)
            ax.bar(x + (j - 0.5) * 0.38, 100 * _vals(rep["metrics"], cats, name), 0.38,
                   yerr=None if err is None else 100 * err, capsize=3, label=lab)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylim((0, 105) if name.startswith("acc") else (-105, 105))
        ax.set_ylabel(ylabel)
        ax.set_xticks(x)
        ax.set_xticklabels(cats, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle(f"BBQ: {labels[0]} vs {labels[1]}")
    fig.tight_layout()
    return _save(fig, path)


def write_all(report: Mapping, out_dir: str, compare_with: Optional[Mapping] = None,
              labels: Sequence[str] = ("before", "after")) -> Dict[str, str]:
    """report.json, report.md, bbq.png (+ comparison.md / comparison.png) into ``out_dir``."""
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "plot": os.path.join(out_dir, "bbq.png")}
    write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], markdown_report(report))
    plot_report(report, paths["plot"])
    if compare_with is not None:
        paths["comparison_markdown"] = os.path.join(out_dir, "comparison.md")
        paths["comparison_plot"] = os.path.join(out_dir, "comparison.png")
        atomic_write_text(paths["comparison_markdown"],
                          comparison_markdown(compare_with, report, labels))
        plot_comparison(compare_with, report, paths["comparison_plot"], labels)
    return paths
