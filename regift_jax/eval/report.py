"""Report artefacts for a BBQ evaluation: report.json, a Markdown summary, PNG plots.

Input is the report dict built by :mod:`regift_jax.eval.evaluate` (``report["metrics"]`` is the
nested dict of :func:`regift_jax.eval.scorer.score`: ``{category | "total": {metric, "ci"}}``;
``report["categories"]`` the category order).  Everything here is presentation: no metric is
computed in this module.

* :func:`to_jsonable` turns NaN / inf into ``null`` and numpy scalars into Python numbers, so
  report.json is strict JSON.
* :func:`markdown_report`: first the paper's layout (Age / Religion / Nationality x Ambig /
  Disambig / Overall, one row per judgement: standard accuracy, paper-compatible exact match,
  unparseable rate), then the BBQ bias scores, then every category with intervals.  Accuracies
  and rates are percentages; bias scores are x100 (range -100 .. 100, as in Parrish et al.).
* :func:`plot_report`: accuracy (ambig / disambig / overall with the overall's interval) and bias
  scores (s_DIS, s_AMB with intervals) per category.  :func:`plot_comparison` and
  :func:`comparison_markdown`: two reports side by side (e.g. before / after fine-tuning).
  Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from regift_jax.eval.bbq import PAPER_CATEGORIES

TOTAL = "total"
_CONDS = (("ambig", "Ambig"), ("disambig", "Disambig"), ("overall", "Overall"))


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")


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


def markdown_report(report: Mapping, title: Optional[str] = None) -> str:
    metrics = report["metrics"]
    cats = _rows(report)
    lines = [f"# {title or report.get('title') or 'BBQ evaluation'}", ""]
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
    notes = list(report.get("notes", []))
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
    lines = [f"# BBQ: {labels[0]} vs {labels[1]} (%, bias x100)", "",
             "| Category | " + " | ".join(f"{h} ({labels[0]} → {labels[1]})" for _, h in cols)
             + " |", "|---|" + "---|" * len(cols)]
    for c in cats:
        b, a = before["metrics"][c], after["metrics"][c]
        cells = [f"{_pct(b.get(k), digits=1)} → {_pct(a.get(k), digits=1)}" for k, _ in cols]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
    plt = _plt()
    metrics = report["metrics"]
    cats = _rows(report) + [TOTAL]
    x = np.arange(len(cats))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cats)), 4.2))
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(before: Mapping, after: Mapping, path: str,
                    labels: Sequence[str] = ("before", "after")) -> str:
    """Overall accuracy, s_DIS and s_AMB per shared category for two reports."""
    plt = _plt()
    cats = [c for c in _rows(before) if c in after["metrics"]] + [TOTAL]
    x = np.arange(len(cats))
    panels = (("acc_overall", "accuracy overall (%)"), ("s_dis", "s_DIS (x100)"),
              ("s_amb", "s_AMB (x100)"))
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 3 * len(cats)), 4.2))
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: Mapping, out_dir: str, compare_with: Optional[Mapping] = None,
              labels: Sequence[str] = ("before", "after")) -> Dict[str, str]:
    """report.json, report.md, bbq.png (+ comparison.md / comparison.png) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "plot": os.path.join(out_dir, "bbq.png")}
    write_json(paths["json"], report)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    plot_report(report, paths["plot"])
    if compare_with is not None:
        paths["comparison_markdown"] = os.path.join(out_dir, "comparison.md")
        paths["comparison_plot"] = os.path.join(out_dir, "comparison.png")
        with open(paths["comparison_markdown"], "w", encoding="utf-8") as f:
            f.write(comparison_markdown(compare_with, report, labels))
        plot_comparison(compare_with, report, paths["comparison_plot"], labels)
    return paths
