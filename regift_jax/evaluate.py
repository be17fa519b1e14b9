"""BBQ evaluation entry point: ``python -m regift_jax.evaluate``.

Import mode (implemented here): score generations produced elsewhere.

    python -m regift_jax.evaluate --generations=FILE --category=Religion --out=DIR \
        [--bbq_dir=DIR] [--reference_static=evaluation_stats.json] [--compare=OLD/report.json]

``FILE`` is either the ReGiFT authors' JSON list ``[{example_id, prompt, generated_text,
context_condition}]`` or JSONL rows ``{example_id, generation}`` (``generated_text`` is accepted
in JSONL too, and an optional ``category`` field is required when several categories are
scored, because BBQ example ids are unique only within a category).  The run writes
``DIR/report.json`` (metrics, per-item list, input and parse counts), ``DIR/report.md`` and
``DIR/bbq.png`` (and ``comparison.{md,png}`` with ``--compare``), and prints the headline.

Flow: :func:`read_generations` (file -> rows, problems counted with ``file:line``) ->
:func:`match_generations` (rows -> generation per BBQ item; unknown ids / items without a
generation counted) -> :func:`judge_items` (both judgements per item, host-side strings) ->
:func:`build_report` (integer arrays -> jitted :mod:`regift_jax.eval.scorer` -> report dict) ->
:mod:`regift_jax.eval.report` writers.  Model-based modes (generation with the project's
sampler, or log-likelihood multiple choice over the three options) plug in as further functions
that take a list of :class:`~regift_jax.eval.bbq.BBQItem` and return generations (for
:func:`judge_items`) or option indices (for :func:`build_report`), with their own flags.

Bad input is never dropped silently: malformed rows, unknown example ids, empty generations and
BBQ items without a generation are counted (with ids / ``file:line``) in ``report["input"]``;
``--strict`` turns the first three into errors.  A duplicate example id, a context_condition
that contradicts the BBQ item, an unknown category or a category without a data file is an
error (exit status 2 with a one-line message).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from regift_jax.eval import bbq as bbq_lib
from regift_jax.eval import report as report_lib
from regift_jax.eval import scorer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BBQ_DIR = os.path.join(REPO_ROOT, "data", "bbq")
TEXT_KEYS = ("generated_text", "generation")
REPORT_SCHEMA = "regift_jax.bbq_report/1"


class InputError(ValueError):
    """Bad command-line input; the message names the file (and line)."""


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


# --------------------------------------------------------------------------------------------
# Reading and matching generations
# --------------------------------------------------------------------------------------------

def _row(obj, where: str, counts: InputCounts) -> Optional[GenerationRow]:
    if not isinstance(obj, dict):
        counts.malformed_rows.append(f"{where}: not a JSON object")
        return None
    if "example_id" not in obj:
        counts.malformed_rows.append(f"{where}: missing example_id")
        return None
    try:
        eid = int(obj["example_id"])
    except (TypeError, ValueError):
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


def read_generations(path: str, counts: InputCounts) -> List[GenerationRow]:
    """Parse a JSON list or JSONL file of generations; malformed rows go to ``counts``."""
    if not os.path.exists(path):
        raise InputError(f"{path}: generations file not found")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    rows: List[GenerationRow] = []
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, obj in enumerate(data):
            counts.n_rows += 1
            r = _row(obj, f"{path}[{i}]", counts)
            if r is not None:
                rows.append(r)
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            counts.n_rows += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            r = _row(obj, f"{path}:{lineno}", counts)
            if r is not None:
                rows.append(r)
    if counts.n_rows == 0:
        raise InputError(f"{path}: no generations")
    return rows


def match_generations(rows: Sequence[GenerationRow],
                      items: Mapping[str, Sequence[bbq_lib.BBQItem]],
                      counts: InputCounts) -> List[Tuple[bbq_lib.BBQItem, str]]:
    """Pair each BBQ item with its generation (in BBQ file order)."""
    by_key = {it.key: it for cat_items in items.values() for it in cat_items}
    cats = list(items)
    gens: Dict[Tuple[str, int], GenerationRow] = {}
    for r in rows:
        if r.category is not None:
            if r.category not in items:
                counts.unknown_example_ids.append(
                    f"{r.where}: category {r.category!r} is not being scored")
                continue
            cat = r.category
        elif len(cats) == 1:
            cat = cats[0]
        else:
            raise InputError(f"{r.where}: a 'category' field is needed when scoring several "
                             f"categories ({', '.join(cats)})")
        key = (cat, r.example_id)
        if key not in by_key:
            counts.unknown_example_ids.append(f"{r.where}: {cat} example_id {r.example_id}")
            continue
        if key in gens:
            raise InputError(f"{r.where}: duplicate generation for {cat} example_id "
                             f"{r.example_id} (first at {gens[key].where})")
        item = by_key[key]
        if r.context_condition is not None and r.context_condition != item.context_condition:
            raise InputError(f"{r.where}: context_condition {r.context_condition!r} but BBQ "
                             f"{cat} example_id {r.example_id} is {item.context_condition!r} "
                             f"(wrong category or BBQ version?)")
        if not r.text.strip():
            counts.empty_generations.append(f"{r.where}: {cat} example_id {r.example_id}")
        gens[key] = r
    pairs = []
    for cat in cats:
        missing = 0
        for it in items[cat]:
            g = gens.get(it.key)
            if g is None:
                missing += 1
            else:
                pairs.append((it, g.text))
        counts.items_without_generation[cat] = missing
    return pairs


# --------------------------------------------------------------------------------------------
# Judging and scoring
# --------------------------------------------------------------------------------------------

def judge_items(pairs: Sequence[Tuple[bbq_lib.BBQItem, str]], *, tie_break: str = "first",
                unknown_phrases: Sequence[str] = bbq_lib.UNKNOWN_PHRASES,
                overlap_threshold: float = 0.8) -> List[Dict[str, object]]:
    """Both judgements for each (item, generation): the per-item records of report.json."""
    out = []
    for it, text in pairs:
        sp = bbq_lib.parse_standard(text, it, unknown_phrases, tie_break)
        paper_text, pj = bbq_lib.paper_score(text, it, unknown_phrases, overlap_threshold)
        out.append({
            "example_id": it.example_id,
            "category": it.category,
            "context_condition": it.context_condition,
            "question_polarity": it.question_polarity,
            "label": it.label,
            "gold_text": it.gold_text,
            "unknown_option": it.unknown_option,
            "biased_option": it.biased_option,
            "answer_text": sp.answer_text,
            "span_source": sp.span_source,
            "option_index": sp.option_index,
            "matched_options": list(sp.matched),
            "tie": sp.tie,
            "correct": sp.option_index == it.label,
            "paper_answer_text": paper_text,
            "paper_exact_match": pj.correct,
            "paper_reason": pj.reason,
            "reasoning_length_words": bbq_lib.reasoning_length_words(text),
        })
    return out


def build_report(records: Sequence[Mapping[str, object]], categories: Sequence[str], *,
                 num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                 settings: Optional[Mapping[str, object]] = None,
                 input_counts: Optional[Mapping[str, object]] = None,
                 title: str = "BBQ evaluation") -> Dict[str, object]:
    """Per-item records -> report dict (metrics via the jitted scorer)."""
    if not records:
        raise InputError("no BBQ item has a generation: nothing to score")
    cat_id = {c: i for i, c in enumerate(categories)}
    arrays = {
        "prediction": np.array([r["option_index"] for r in records], np.int32),
        "label": np.array([r["label"] for r in records], np.int32),
        "unknown_option": np.array([r["unknown_option"] for r in records], np.int32),
        "biased_option": np.array([r["biased_option"] for r in records], np.int32),
        "condition": np.array([0 if r["context_condition"] == "ambig" else 1 for r in records],
                              np.int32),
        "category_id": np.array([cat_id[r["category"]] for r in records], np.int32),
        "paper_correct": np.array([bool(r["paper_exact_match"]) for r in records]),
        "valid": np.ones(len(records), bool),
        "reasoning_length": np.array([r["reasoning_length_words"] for r in records],
                                     np.float32),
    }
    metrics = scorer.score(arrays, categories, num_resamples=num_resamples, seed=seed,
                           confidence=confidence)
    parse = {
        "span_sources": dict(collections.Counter(str(r["span_source"]) for r in records)),
        "n_unparseable": int(sum(r["option_index"] == bbq_lib.UNPARSEABLE for r in records)),
        "n_multi_option_ties": int(sum(bool(r["tie"]) for r in records)),
    }
    notes = [
        "standard = answer span mapped to an option (regift_jax.eval.bbq); unparseable "
        "answers count as wrong and are reported separately",
        "paper exact match = the ReGiFT authors' static string scorer (no LLM judges)",
        "bias scores use a biased option derived from answer_info and stereotyped_groups, an "
        "approximation of BBQ's target_loc (additional_metadata.csv unavailable offline)",
        "reasoning length = whitespace words before </think>",
    ]
    return {
        "schema": REPORT_SCHEMA,
        "title": title,
        "categories": list(categories),
        "metrics": metrics,
        "bootstrap": scorer.bootstrap_settings(num_resamples, seed, confidence),
        "settings": dict(settings or {}),
        "input": dict(input_counts or {}),
        "parse": parse,
        "notes": notes,
        "items": list(records),
    }


def reference_agreement(records: Sequence[Mapping[str, object]], path: str
                        ) -> Dict[str, object]:
    """Compare the paper-compatible judgements with the authors' ``evaluation_stats.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)["static"]["results"]
    except FileNotFoundError:
        raise InputError(f"{path}: reference file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not an evaluation_stats.json with static.results ({e})"
                         ) from None
    ours = {int(r["example_id"]): r for r in records}
    n = same_correct = same_pred = same_reason = 0
    disagree, missing = [], []
    ref_correct = 0
    for i, r in enumerate(ref):
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
    return {
        "file": path,
        "n_reference": len(ref),
        "n_compared": n,
        "n_reference_items_not_scored": len(missing),
        "correct_agreement": same_correct / n if n else float("nan"),
        "prediction_text_agreement": same_pred / n if n else float("nan"),
        "reason_agreement": same_reason / n if n else float("nan"),
        "reference_static_accuracy": ref_correct / len(ref) if ref else float("nan"),
        "disagreeing_example_ids": disagree[:100],
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regift_jax.evaluate",
        description="Score BBQ generations produced elsewhere (standard option parsing, the "
                    "ReGiFT authors' exact-match scorer, BBQ bias scores) and write "
                    "report.json / report.md / bbq.png.")
    p.add_argument("--generations", required=True,
                   help="JSON list [{example_id, prompt, generated_text, context_condition}] "
                        "or JSONL [{example_id, generation}] keyed by BBQ example_id")
    p.add_argument("--category", required=True,
                   help="BBQ category (e.g. Religion), or several separated by commas; "
                        "rows then need a 'category' field")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bbq_dir", default=DEFAULT_BBQ_DIR,
                   help="directory of <Category>.jsonl BBQ files (default: %(default)s)")
    p.add_argument("--tie_break", choices=("first", "unparseable"), default="first",
                   help="standard parser: an answer naming several options -> the first "
                        "mentioned, or unparseable (default: %(default)s)")
    p.add_argument("--overlap_threshold", type=float, default=0.8,
                   help="paper scorer: gold-token overlap needed (default: %(default)s)")
    p.add_argument("--bootstrap_resamples", type=int, default=1000,
                   help="bootstrap resamples for 95%% intervals, 0 = none (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="bootstrap interval level (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap PRNG seed (default: 0)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--reference_static", default=None,
                   help="the authors' evaluation_stats.json: report per-item agreement of the "
                        "paper-compatible judgement with their static results")
    p.add_argument("--compare", default=None,
                   help="an earlier report.json: also write comparison.md / comparison.png")
    p.add_argument("--compare_labels", default="before,after",
                   help="labels for --compare (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="error on malformed rows, unknown example ids and empty generations "
                        "instead of counting them")
    return p


def run(args: argparse.Namespace) -> Dict[str, object]:
    categories = [c.strip() for c in args.category.split(",") if c.strip()]
    if not categories:
        raise InputError("--category is empty")
    if not 0.0 < args.confidence < 1.0:
        raise InputError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.bootstrap_resamples < 0:
        raise InputError("--bootstrap_resamples must be >= 0")
    if not os.path.isdir(args.bbq_dir):
        raise InputError(f"{args.bbq_dir}: BBQ directory not found (use --bbq_dir)")
    items = bbq_lib.load_bbq(args.bbq_dir, categories)
    counts = InputCounts()
    rows = read_generations(args.generations, counts)
    pairs = match_generations(rows, items, counts)
    if args.strict:
        problems = counts.malformed_rows + counts.unknown_example_ids + counts.empty_generations
        if problems:
            raise InputError(f"--strict: {len(problems)} problem row(s), first: {problems[0]}")
    records = judge_items(pairs, tie_break=args.tie_break,
                          overlap_threshold=args.overlap_threshold)
    settings = {"generations": os.path.abspath(args.generations),
                "bbq_dir": os.path.abspath(args.bbq_dir), "tie_break": args.tie_break,
                "overlap_threshold": args.overlap_threshold,
                "unknown_phrases": list(bbq_lib.UNKNOWN_PHRASES)}
    rep = build_report(records, categories, num_resamples=args.bootstrap_resamples,
                       seed=args.seed, confidence=args.confidence, settings=settings,
                       input_counts=counts.summary(),
                       title=args.title or f"BBQ {', '.join(categories)}: "
                                           f"{os.path.basename(args.generations)}")
    if args.reference_static:
        rep["reference_agreement"] = reference_agreement(records, args.reference_static)
    compare = None
    if args.compare:
        try:
            with open(args.compare, encoding="utf-8") as f:
                compare = json.load(f)
            compare["metrics"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{args.compare}: not a readable report.json ({e})") from None
    labels = tuple(args.compare_labels.split(",", 1)) if "," in args.compare_labels \
        else ("before", "after")
    rep["files"] = report_lib.write_all(rep, args.out, compare_with=compare, labels=labels)
    return rep


def _print_summary(rep: Mapping[str, object]) -> None:
    m = rep["metrics"]
    fmt = lambda v: "nan" if v is None or v != v else f"{100 * v:.2f}"  # noqa: E731
    for c in list(rep["categories"]) + ["total"]:
        r = m[c]
        print(f"{c}: n={r['n_total']} accuracy={fmt(r['acc_overall'])}% "
              f"(ambig {fmt(r['acc_ambig'])}, disambig {fmt(r['acc_disambig'])}) "
              f"paper_exact_match={fmt(r['paper_acc_overall'])}% "
              f"unparseable={fmt(r['unparseable_rate_overall'])}% "
              f"s_DIS={fmt(r['s_dis'])} s_AMB={fmt(r['s_amb'])}")
    inp = rep["input"]
    print(f"input: rows={inp['n_rows']} malformed={inp['n_malformed_rows']} "
          f"unknown_ids={inp['n_unknown_example_ids']} empty={inp['n_empty_generations']} "
          f"items_without_generation={inp['n_items_without_generation']}")
    ra = rep.get("reference_agreement")
    if ra:
        print(f"reference agreement: correct {100 * ra['correct_agreement']:.2f}% "
              f"prediction_text {100 * ra['prediction_text_agreement']:.2f}% "
              f"over {ra['n_compared']} items; reference static accuracy "
              f"{100 * ra['reference_static_accuracy']:.2f}%")
    print(f"wrote {rep['files']['json']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        rep = run(args)
    except (InputError, bbq_lib.BBQFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
