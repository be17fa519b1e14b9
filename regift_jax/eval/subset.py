"""Deterministic, balanced BBQ item subsets (``data.max_items`` / ``data.max_items_per_category``).

A subset keeps whole context paragraphs (:func:`context_units`: an ambiguous context with its
disambiguated versions, usually the four variants ambiguous/disambiguated x negative/non-negative
question), so it holds equal shares of the four strata, keeps paired comparisons and lets the
scorer share prompt prefixes; the same units are the clusters of the bootstrap
(:func:`context_groups`).  The order of the paragraphs is shuffled by a PRNG seeded with
``data.subset_seed`` and the category name, so a category's subset does not depend on the other
categories.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from regift_jax.data.bbq import BBQItem
from regift_jax.eval.config import InputError

_STRATA = (("ambig", "neg"), ("ambig", "nonneg"), ("disambig", "neg"), ("disambig", "nonneg"))


def context_units(items: Sequence[BBQItem]) -> List[List[BBQItem]]:
    """BBQ items grouped by context paragraph, in file order: an ambiguous context and every
    item whose context extends it (its disambiguated versions), usually the four variants
    ambiguous/disambiguated x negative/non-negative question.  An item that extends no
    ambiguous context of the list is a unit of its own."""
    ambig = {it.context for it in items if it.context_condition == "ambig"}
    units: Dict[str, List[BBQItem]] = {}
    for it in items:
        key = it.context
        if it.context_condition != "ambig":
            cuts = [i for i, ch in enumerate(it.context) if ch == " "]
            hits = [it.context[:i] for i in cuts if it.context[:i] in ambig]
            key = max(hits, key=len) if hits else "\0" + it.context
        units.setdefault(key, []).append(it)
    return list(units.values())


def context_groups(items: Sequence[BBQItem]) -> Dict[Tuple[str, int], str]:
    """``{item.key: group id}``: the :func:`context_units` of each category, named
    ``"<category>:<first example_id>"``.  These are the clusters of the bootstrap: on the
    official files each unit is one example-id group 4k..4k+3 (ambiguous / disambiguated x
    negative / non-negative question), or two such groups whose context paragraphs are the same
    text (59 in Disability_status, 4 in Physical_appearance)."""
    by_cat: Dict[str, List[BBQItem]] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    out = {}
    for cat, cat_items in by_cat.items():
        for unit in context_units(cat_items):
            name = f"{cat}:{unit[0].example_id}"
            out.update({it.key: name for it in unit})
    return out


def add_context_groups(records: List[dict], items: Sequence[BBQItem]) -> List[dict]:
    """Set ``record["context_group"]`` (:func:`context_groups` of ``items``) on per-item
    records that carry ``category`` and ``example_id``; returns ``records``."""
    groups = context_groups(items)
    for r in records:
        r["context_group"] = groups[(r["category"], r["example_id"])]
    return records


def balanced_order(items: Sequence[BBQItem], seed: int = 0) -> List[BBQItem]:
    """``items`` reordered for subsetting: whole context units (:func:`context_units`) in an
    order shuffled by a PRNG seeded with ``seed`` and the category name (deterministic,
    independent of other categories), each unit's items interleaved over the four strata
    (context condition x question polarity).  Every prefix of the result is therefore balanced
    over the strata (within one item when the units are complete) and keeps a context's
    variants together (paired comparisons; shared prompt prefixes for the scorer)."""
    units = context_units(items)
    if not units:
        return []
    name = units[0][0].category.encode()
    rng = np.random.default_rng([int(seed), zlib.crc32(name)])
    out = []
    for u in rng.permutation(len(units)):
        by = {s: [it for it in units[u] if (it.context_condition, it.question_polarity) == s]
              for s in _STRATA}
        for j in range(max(len(v) for v in by.values())):
            out.extend(by[s][j] for s in _STRATA if j < len(by[s]))
    return out


def _quotas(avail: Mapping[str, int], max_items: Optional[int]) -> Dict[str, int]:
    """Items per category: ``max_items`` shared as evenly as possible, a category with fewer
    items passing its unused share on."""
    quota = dict(avail)
    if max_items is not None and sum(avail.values()) > max_items:
        quota = {c: 0 for c in avail}
        left = max_items
        while left > 0:
            open_cats = [c for c in avail if quota[c] < avail[c]]
            share = max(1, left // len(open_cats))
            for c in open_cats:
                take = min(share, avail[c] - quota[c], left)
                quota[c] += take
                left -= take
                if left == 0:
                    break
    return quota


def select_subset(items: Mapping[str, Sequence[BBQItem]],
                  max_items: Optional[int] = None,
                  max_items_per_category: Optional[int] = None,
                  seed: int = 0) -> Dict[str, List[BBQItem]]:
    """A deterministic, balanced subset, each category's items kept in file order.

    ``max_items_per_category`` caps every category; ``max_items`` caps the total, shared as
    evenly as possible between the categories (a category with fewer items passes its unused
    share on).  Within a category the first items of :func:`balanced_order` are taken: whole
    context paragraphs with their four variants, so the subset holds equal shares of
    ambiguous/disambiguated and negative/non-negative questions.
    """
    for name, v in (("max_items", max_items), ("max_items_per_category",
                                               max_items_per_category)):
        if v is not None and v < 1:
            raise InputError(f"--{name} must be >= 1, got {v}")
    avail = {c: len(v) for c, v in items.items()}
    if max_items_per_category is not None:
        avail = {c: min(n, max_items_per_category) for c, n in avail.items()}
    quota = _quotas(avail, max_items)
    out = {}
    for c, v in items.items():
        if quota[c] >= len(v):
            out[c] = list(v)
            continue
        chosen = {id(it) for it in balanced_order(v, seed)[:quota[c]]}
        out[c] = [it for it in v if id(it) in chosen]
    return out
