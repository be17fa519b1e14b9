"""Import mode: generations produced elsewhere, read and paired with their BBQ items.

A generations file is either the ReGiFT authors' JSON list ``[{example_id, prompt,
generated_text, context_condition}]`` or JSONL rows ``{example_id, generation}``
(``generated_text`` is accepted in JSONL too, and an optional ``category`` field is required
when several categories are scored, because BBQ example ids are unique only within a category).
JSONL is read through :func:`regift_jax.core.io.iter_jsonl`.

Bad input is never dropped silently: a row that is not an object, has no ``example_id`` or no
text counts as malformed, an unknown id as unknown, an empty text as empty, a BBQ item without
a generation as missing (:class:`InputCounts`, with ``file:line``).  A line that is not JSON, a
duplicate example id or a ``context_condition`` that contradicts the BBQ item is an
:class:`~regift_jax.eval.config.InputError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from regift_jax.core.io import BLANK, NOT_AN_OBJECT, StrictLineCounts, iter_jsonl
from regift_jax.data.bbq import BBQItem
from regift_jax.eval.config import InputError

TEXT_KEYS = ("generated_text", "generation")


@dataclasses.dataclass(frozen=True)
class GenerationRow:
    example_id: int
    text: str
    where: str  # "file:line" (JSONL) or "file[index]" (JSON list)
    category: Optional[str] = None
    context_condition: Optional[str] = None


@dataclasses.dataclass
class InputCounts:
    n_rows: int = 0
    malformed_rows: List[str] = dataclasses.field(default_factory=list)
    unknown_example_ids: List[str] = dataclasses.field(default_factory=list)
    empty_generations: List[str] = dataclasses.field(default_factory=list)
    items_without_generation: Dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self, max_listed: int = 50) -> Dict[str, object]:
        def cut(xs):
            return xs[:max_listed] + ([f"... {len(xs) - max_listed} more"]
                                      if len(xs) > max_listed else [])
        return {
            "n_rows": self.n_rows,
            "n_malformed_rows": len(self.malformed_rows),
            "n_unknown_example_ids": len(self.unknown_example_ids),
            "n_empty_generations": len(self.empty_generations),
            "n_items_without_generation": int(sum(self.items_without_generation.values())),
            "items_without_generation_by_category": dict(self.items_without_generation),
            "malformed_rows": cut(self.malformed_rows),
            "unknown_example_ids": cut(self.unknown_example_ids),
            "empty_generations": cut(self.empty_generations),
        }

    @property
    def problems(self) -> List[str]:
        """The rows ``judge.strict`` turns into an error."""
        return self.malformed_rows + self.unknown_example_ids + self.empty_generations


def _example_id(v) -> Optional[int]:
    """An int, or an integral float / decimal string (the JSON of some exporters); else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit() and len(v) < 20:
        return int(v)
    return None


def _row(obj, where: str, counts: InputCounts) -> Optional[GenerationRow]:
    if not isinstance(obj, dict):
        counts.malformed_rows.append(f"{where}: not a JSON object")
        return None
    if "example_id" not in obj:
        counts.malformed_rows.append(f"{where}: missing example_id")
        return None
    eid = _example_id(obj["example_id"])
    if eid is None:
        counts.malformed_rows.append(f"{where}: example_id {obj['example_id']!r} is not an int")
        return None
    key = next((k for k in TEXT_KEYS if k in obj), None)
    if key is None:
        counts.malformed_rows.append(f"{where}: missing {' or '.join(TEXT_KEYS)}")
        return None
    text = obj[key]
    if text is None:
        text = ""
    if not isinstance(text, str):
        counts.malformed_rows.append(f"{where}: {key} is not a string")
        return None
    return GenerationRow(eid, text, where, obj.get("category"), obj.get("context_condition"))


class _JsonlLines(StrictLineCounts):
    """Lines of a generations JSONL: blank lines are skipped, a non-object line is a malformed
    row, anything else unreadable is an :class:`InputError`."""

    def __init__(self, counts: InputCounts):
        super().__init__(InputError, tolerate=(BLANK, NOT_AN_OBJECT))
        self.input_counts = counts

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        super().skip(reason, where, detail)
        if reason == NOT_AN_OBJECT:
            self.input_counts.n_rows += 1
            self.input_counts.malformed_rows.append(f"{where}: not a JSON object")


def _read_json_list(path: str, raw: bytes, counts: InputCounts) -> List[GenerationRow]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: invalid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # json's limits: huge integers, deep nesting
        raise InputError(f"{path}: unreadable JSON ({e})") from None
    rows = []
    for i, obj in enumerate(data):
        counts.n_rows += 1
        r = _row(obj, f"{path}[{i}]", counts)
        if r is not None:
            rows.append(r)
    return rows


def read_generations(path: str, counts: InputCounts) -> List[GenerationRow]:
    """Parse a JSON list or JSONL file of generations; malformed rows go to ``counts``."""
    if not os.path.exists(path):
        raise InputError(f"{path}: generations file not found")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.lstrip().startswith(b"["):
        rows = _read_json_list(path, raw, counts)
    else:
        rows = []
        for lineno, obj in iter_jsonl(path, _JsonlLines(counts)):
            counts.n_rows += 1
            r = _row(obj, f"{path}:{lineno}", counts)
            if r is not None:
                rows.append(r)
    if counts.n_rows == 0:
        raise InputError(f"{path}: no generations")
    return rows


def _category_of(r: GenerationRow, cats: Sequence[str], counts: InputCounts) -> Optional[str]:
    if r.category is not None:
        if r.category not in cats:
            counts.unknown_example_ids.append(
                f"{r.where}: category {r.category!r} is not being scored")
            return None
        return r.category
    if len(cats) == 1:
        return cats[0]
    raise InputError(f"{r.where}: a 'category' field is needed when scoring several "
                     f"categories ({', '.join(cats)})")


def _check_row(r: GenerationRow, cat: str, item: BBQItem,
               gens: Mapping[Tuple[str, int], GenerationRow]) -> None:
    if item.key in gens:
        raise InputError(f"{r.where}: duplicate generation for {cat} example_id "
                         f"{r.example_id} (first at {gens[item.key].where})")
    if r.context_condition is not None and r.context_condition != item.context_condition:
        raise InputError(f"{r.where}: context_condition {r.context_condition!r} but BBQ "
                         f"{cat} example_id {r.example_id} is {item.context_condition!r} "
                         f"(wrong category or BBQ version?)")


def match_generations(rows: Sequence[GenerationRow],
                      items: Mapping[str, Sequence[BBQItem]],
                      counts: InputCounts) -> List[Tuple[BBQItem, str]]:
    """Pair each BBQ item with its generation (in BBQ file order)."""
    by_key = {it.key: it for cat_items in items.values() for it in cat_items}
    cats = list(items)
    gens: Dict[Tuple[str, int], GenerationRow] = {}
    for r in rows:
        cat = _category_of(r, cats, counts)
        if cat is None:
            continue
        item = by_key.get((cat, r.example_id))
        if item is None:
            counts.unknown_example_ids.append(f"{r.where}: {cat} example_id {r.example_id}")
            continue
        _check_row(r, cat, item, gens)
        if not r.text.strip():
            counts.empty_generations.append(f"{r.where}: {cat} example_id {r.example_id}")
        gens[item.key] = r
    pairs = []
    for cat in cats:
        found = [(it, gens[it.key].text) for it in items[cat] if it.key in gens]
        counts.items_without_generation[cat] = len(items[cat]) - len(found)
        pairs.extend(found)
    return pairs
