"""lm-eval's BBQ task over the vendored official BBQ files: ``--tasks bbq`` with no network.

lm-eval 0.4.13's ``bbq`` task reads the Hugging Face hub copy ``oskarvanderwal/bbq`` (config
``All``, split ``test``).  That copy holds the official JSONL rows of github.com/nyu-mll/BBQ
unchanged: ``example_id``, ``question_index``, ``question_polarity``, ``context_condition``,
``category``, ``answer_info`` (``{ans0, ans1, ans2}: [name, group]``), ``additional_metadata``
(``subcategory``, ``stereotyped_groups``, ``version``, ``source``), ``context``, ``question``,
``ans0``..``ans2`` and ``label``.  :func:`load_bbq` builds the same ``test`` split from the
official files in :func:`regift_jax.data.bbq.default_bbq_dir` (the vendored ``data/bbq``: 6 of
the 11 categories, or ``$REGIFT_DATA_DIR/bbq``), read by the project's one BBQ reader and written
back field for field (:func:`hub_row`; the test checks rows equal the files'), so no field is
reconstructed.  The fields lm-eval derives (``biased_answers``,
``ans0_groups``..``ans2_groups``) and everything else (prompt, the 12 choices with HELM's unknown
phrasings, targets, metrics) come from lm-eval's own ``lm_eval/tasks/bbq/utils.py``, imported
below unchanged: this task is lm-eval's, so that its numbers are lm-eval's.  The project's
statement of the same rules, :func:`regift_jax.data.bbq.lm_eval_doc` (its ``lm_eval``
log-likelihood format), is tested against these functions on every row.

Row order: categories in the official order (:data:`regift_jax.data.bbq.CATEGORIES`, files that
are absent skipped), each file in its line order.  The hub copy's order of ``All`` cannot be
checked offline, so ``--limit N`` may select different rows than with the hub copy; select
items by content (``samples`` / ``--samples``) to compare runs.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Optional, Sequence

import datasets
import lm_eval.tasks.bbq.utils as upstream
# The task's functions, unchanged, so the offline task scores exactly like lm-eval's own.
from lm_eval.tasks.bbq.utils import (  # noqa: F401
    UNKNOWN_RESPONSES, agg_accuracy_amb, agg_accuracy_disamb, agg_amb_bias_scores,
    agg_disamb_bias_scores, doc_to_biased_answer, doc_to_choice, doc_to_target, doc_to_targets,
    process_results_generate_until, process_results_multiple_choice)

from regift_jax.data.bbq import (CATEGORIES, BBQItem, available_categories, bbq_path,
                                 default_bbq_dir, lm_eval_unknown_option, read_bbq_file)

_PROCESSED: "collections.OrderedDict[tuple, datasets.Dataset]" = collections.OrderedDict()


def _once_per_dataset(fn):
    """lm-eval runs ``process_docs`` on every access to a task's documents.  For the hub copy
    the repeats come from ``datasets``' on-disk cache; this split lives in memory, so each would
    map all rows again: keep the result per input fingerprint (a few entries)."""
    @functools.wraps(fn)
    def wrapper(dataset: datasets.Dataset) -> datasets.Dataset:
        key = (fn.__name__, dataset._fingerprint)  # content hash of the split
        if key not in _PROCESSED:
            _PROCESSED[key] = fn(dataset)
            while len(_PROCESSED) > 8:
                _PROCESSED.popitem(last=False)
        return _PROCESSED[key]
    return wrapper


process_docs = _once_per_dataset(upstream.process_docs)
process_docs_ambig = _once_per_dataset(upstream.process_docs_ambig)
process_docs_disambig = _once_per_dataset(upstream.process_docs_disambig)


def hub_row(item: BBQItem) -> dict:
    """A row as the official file (and the hub copy) holds it, from the project's reader."""
    info = {f"ans{i}": list(item.answer_info[i]) for i in range(3)}
    meta = {"subcategory": item.subcategory, "stereotyped_groups": list(item.stereotyped_groups),
            "version": item.version, "source": item.metadata_source}
    return {"example_id": item.example_id, "question_index": item.question_index,
            "question_polarity": item.question_polarity,
            "context_condition": item.context_condition, "category": item.category,
            "answer_info": info, "additional_metadata": meta, "context": item.context,
            "question": item.question, "ans0": item.options[0], "ans1": item.options[1],
            "ans2": item.options[2], "label": item.label}


def read_rows(path: str) -> list:
    """The rows of one official BBQ file (:func:`regift_jax.data.bbq.read_bbq_file`, the one
    reader), checked for the one option among the unknown phrasings lm-eval's ``doc_to_choice``
    needs (:func:`regift_jax.data.bbq.lm_eval_unknown_option`); errors name ``file:line``."""
    rows = []
    for item in read_bbq_file(path):
        lm_eval_unknown_option(item)
        rows.append(hub_row(item))
    return rows


def bbq_files(bbq_dir: Optional[str] = None,
              categories: Optional[Sequence[str]] = None) -> list:
    """``<bbq_dir>/<Category>.jsonl`` of every official category present (or of
    ``categories``, each required), in the official category order."""
    bbq_dir = bbq_dir or default_bbq_dir()
    if not bbq_dir or not os.path.isdir(bbq_dir):
        raise FileNotFoundError(
            f"no BBQ directory ({bbq_dir or 'no data root'}): run from a source checkout (the "
            f"vendored data/bbq), set REGIFT_DATA_DIR, or pass metadata bbq_dir=DIR")
    if not categories:
        present = available_categories(bbq_dir)
        if not present:
            raise FileNotFoundError(f"{bbq_dir}: no official BBQ <Category>.jsonl file")
        return [bbq_path(bbq_dir, c) for c in present]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown BBQ categories {unknown}; known: {', '.join(CATEGORIES)}")
    paths = [bbq_path(bbq_dir, c) for c in CATEGORIES if c in categories]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"BBQ files missing: {', '.join(missing)}")
    return paths


def load_bbq(bbq_dir: Optional[str] = None, categories: Optional[Sequence[str]] = None,
             **_metadata) -> datasets.DatasetDict:
    """The ``test`` split of the offline ``bbq`` task (lm-eval's ``custom_dataset`` hook; it
    passes the task metadata and the model arguments as keywords, which are ignored here)."""
    if isinstance(categories, str):  # --metadata '{"categories": "Age,Religion"}'
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    rows = [r for p in bbq_files(bbq_dir, categories) for r in read_rows(p)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
