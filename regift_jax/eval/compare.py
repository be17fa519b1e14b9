"""Before / after: the paired test of two BBQ reports on the same items.

:func:`paired_comparison` pairs the per-item records of two reports by ``(category,
example_id)`` and tests every headline metric's change with the paired cluster bootstrap
(:func:`regift_jax.eval.scorer.paired`: each resample of context groups is applied to both
judgements, so the spread of ``after - before`` keeps the pairing), and per-item correctness with
the exact McNemar test (the discordant items: wrong before and right after, and the reverse).
The result goes into the "after" report as ``report["comparison"]``; ``comparison.md``, the
console summary and the experiment's verdict print the p-value beside each change.  A change
with ``p >= 1 - confidence`` (0.05) is inside the noise.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import numpy as np

from regift_jax.eval import scorer
from regift_jax.eval.report import TOTAL, bootstrap_unit, record_arrays

METHOD = ("paired cluster bootstrap of after - before (context groups resampled jointly for "
          "both), two-sided p = min(1, 2 min(P(d <= 0), P(d >= 0))); McNemar: exact binomial "
          "test on the discordant items of per-item correctness")


def mcnemar(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> Dict[str, float]:
    """Exact two-sided McNemar test: ``n_improved`` (wrong -> right), ``n_worsened`` (right ->
    wrong) and ``p_value`` (1 when there is no discordant item)."""
    b = np.asarray(before_correct, bool)
    a = np.asarray(after_correct, bool)
    up, down = int(np.sum(~b & a)), int(np.sum(b & ~a))
    n, k = up + down, min(up, down)
    if n == 0:
        return {"n_improved": 0, "n_worsened": 0, "p_value": 1.0}
    ks = np.arange(k + 1)
    logpmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1)
                                             for i in ks]) - n * math.log(2.0))
    tail = float(np.exp(np.logaddexp.reduce(logpmf)))
    return {"n_improved": up, "n_worsened": down, "p_value": min(1.0, 2.0 * tail)}


def _paired_records(before: Mapping, after: Mapping):
    """The after report's items that the before report also judged, and those before items."""
    key = lambda r: (r["category"], int(r["example_id"]))  # noqa: E731
    old = {key(r): r for r in before.get("items", [])}
    pairs = [(old[key(r)], r) for r in after["items"] if key(r) in old]
    return [b for b, _ in pairs], [a for _, a in pairs]


def paired_comparison(before: Mapping, after: Mapping, *, num_resamples: int = 1000,
                      seed: int = 0, confidence: float = 0.95) -> Dict[str, object]:
    """``report["comparison"]`` of ``after`` against ``before`` (see the module docstring)."""
    b_items, a_items = _paired_records(before, after)
    cats = [c for c in after["categories"] if any(r["category"] == c for r in a_items)]
    out: Dict[str, object] = {
        "n_paired": len(a_items),
        "n_after_unpaired": len(after["items"]) - len(a_items),
        "n_before_unpaired": len(before.get("items", [])) - len(b_items),
        "resamples": int(num_resamples), "seed": int(seed), "confidence": float(confidence),
        "unit": bootstrap_unit(a_items), "method": METHOD, "metrics": {}, "mcnemar": {}}
    if not a_items:
        return out
    out["metrics"] = scorer.paired(
        record_arrays(b_items, cats), record_arrays(a_items, cats), cats,
        num_resamples=num_resamples, seed=seed, confidence=confidence, total_name=TOTAL)
    for c in cats + [TOTAL]:
        sel = [i for i, r in enumerate(a_items) if c == TOTAL or r["category"] == c]
        out["mcnemar"][c] = mcnemar([bool(b_items[i]["correct"]) for i in sel],
                                    [bool(a_items[i]["correct"]) for i in sel])
    return out


def inside_noise(comparison: Mapping, metric: str, row: str = TOTAL) -> bool:
    """Whether the paired test leaves ``metric``'s change inside the noise (p >= 1 -
    confidence, or no test)."""
    m = comparison.get("metrics", {}).get(row, {}).get(metric)
    p = None if m is None else m.get("p_value")
    if p is None or p != p:
        return True
    return p >= 1.0 - float(comparison.get("confidence", 0.95))
