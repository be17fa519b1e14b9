"""Training examples: dicts ``{id, context, question, reasoning, answer}`` from the configured
source, and the deterministic held-out split for the evaluation loss.

Sources (``data.kind`` / ``data.source``):

* ``traces`` with ``data.source = "tfds:regift_traces/<config>"`` (the default,
  ``tfds:regift_traces/correct``): the ``regift_traces`` TFDS builder
  (:mod:`regift_jax.data.builders.regift_traces`), built offline from the trace shards of the
  data root (``data/traces/`` or ``$REGIFT_DATA_DIR/traces``) into ``data.tfds_data_dir``
  (default ``$REGIFT_CACHE_DIR/tfds/<digest of the shards>``, ``REGIFT_CACHE_DIR`` defaulting to
  ``~/.cache/regift_jax``), then read back in its stored order.  The builder config must agree
  with ``data.selection`` / ``data.criterion``.  Several processes each build deterministically
  into a private temporary directory and move it into place; the first move wins and the others
  discard theirs, so no process waits for another and none reads a half-written dataset.
* ``traces`` with a path: JSONL shards (a directory, a glob or a file) read with
  :func:`regift_jax.data.records.read_trace_jsonl` (bad lines dropped and counted, the report
  logged), then ``select_records(selection, criterion)``.  The builder runs the same reader and
  the same selection and stores the records in the same order, so both sources give the same
  examples in the same order (tested).
* ``squad_gold``: SQuAD-v2 questions of ``squad_split``
  (:func:`regift_jax.data.squad.load_split`) with their first gold answer (``Not in
  background.`` for unanswerable ones).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import List, Tuple

from regift_jax.core import prompts
from regift_jax.core.paths import REPO_ROOT, cache_dir, default_source_dir
from regift_jax.data import records as rec_lib
from regift_jax.data import squad
from regift_jax.data.pipeline import load_shard
from regift_jax.models.fingerprint import path_digest

log = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"
TFDS_BUILDERS = ("regift_traces",)
FIELDS = ("id", "context", "question", "reasoning", "answer")


def resolve_path(p: str) -> str:
    """A relative path as given if it exists from the working directory, else under the
    repository root (if it exists there)."""
    if not p or os.path.isabs(p) or os.path.exists(p):
        return p
    alt = os.path.join(REPO_ROOT, p)
    return alt if os.path.exists(alt) else p


def is_tfds_source(source: str) -> bool:
    return str(source).startswith(TFDS_PREFIX)


def load_examples(dcfg) -> Tuple[List[dict], dict]:
    """Training examples of ``data.kind`` / ``data.source`` and a summary of the read."""
    if dcfg.kind == "traces":
        if is_tfds_source(dcfg.source):
            return _tfds_traces(dcfg)
        return _jsonl_traces(dcfg)
    if dcfg.kind == "squad_gold":
        return _squad_gold(dcfg)
    raise ValueError(f"data.kind={dcfg.kind!r}; valid: traces, squad_gold")


def _example(r) -> dict:
    """The fields training reads, from a :class:`TraceRecord` or a decoded TFDS element."""
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return {k: get(k) for k in FIELDS}


def _jsonl_source(dcfg) -> str:
    src = resolve_path(dcfg.source)
    if not src or not (os.path.exists(src) or any(c in src for c in "*?[")):
        raise FileNotFoundError(
            f"data.source={dcfg.source!r}: trace set not found (generate it with "
            "regift_jax.generate_traces, point --config.data.source at a directory of *.jsonl "
            "shards, e.g. tests/fixtures/train/traces, or use tfds:regift_traces/correct)")
    return src


def _jsonl_traces(dcfg) -> Tuple[List[dict], dict]:
    src = _jsonl_source(dcfg)
    recs, report = rec_lib.read_trace_jsonl(src)
    report.log(log)
    out = [_example(r) for r in rec_lib.select_records(recs, dcfg.selection, dcfg.criterion)]
    summary = {"source": src, "lines": report.n_lines, "records": report.n_records,
               "dropped": report.n_dropped, "selected": len(out),
               "selection": dcfg.selection, "criterion": dcfg.criterion}
    return out, summary


def _squad_dir(dcfg) -> str:
    src = resolve_path(dcfg.source) if dcfg.source else default_source_dir("squad_v2")
    if not src or not os.path.isdir(src):
        raise FileNotFoundError(f"data.source={dcfg.source!r}: no SQuAD-v2 directory "
                                "(expected dev-v2.0.json or dev-v2.0.reconstructed.json)")
    if dcfg.squad_split not in squad.SPLITS:
        raise ValueError(f"data.squad_split={dcfg.squad_split!r}; valid: "
                         f"{', '.join(squad.SPLITS)}")
    return src


def _squad_gold(dcfg) -> Tuple[List[dict], dict]:
    src = _squad_dir(dcfg)
    rows = squad.load_split(src, dcfg.squad_split, int(dcfg.squad_num_buckets),
                            int(dcfg.squad_pool_buckets))
    out = [{"id": r["id"], "context": r["context"], "question": r["question"],
            "reasoning": "",
            "answer": prompts.NOT_IN_BACKGROUND if r["is_impossible"]
            else r["answers"][0]["text"]} for r in rows]
    return out, {"source": src, "split": dcfg.squad_split, "selected": len(out)}


# ============================================================================ the TFDS source
def parse_tfds_source(source: str) -> Tuple[str, str]:
    """``"tfds:NAME/CONFIG"`` -> ``(NAME, CONFIG)``; a clear error for anything else."""
    name, _, config = source[len(TFDS_PREFIX):].partition("/")
    if name not in TFDS_BUILDERS or not config:
        raise ValueError(f"data.source={source!r}: a TFDS source is tfds:<builder>/<config> "
                         f"with builder in {', '.join(TFDS_BUILDERS)} (e.g. "
                         "tfds:regift_traces/correct)")
    return name, config


def trace_shards() -> List[str]:
    """The trace shards the ``regift_traces`` builder reads by default (the data root's
    ``traces/``)."""
    src = default_source_dir("traces")
    if src is None:
        raise FileNotFoundError(
            "tfds:regift_traces needs trace shards in data/traces/ (or $REGIFT_DATA_DIR/traces); "
            "generate them with regift_jax.generate_traces or set data.source to a JSONL path")
    return rec_lib.resolve_trace_paths(src)


def shards_digest(shards: List[str]) -> str:
    """sha256 (hex) of trace shards' names and contents, in order (file digests are cached)."""
    h = hashlib.sha256()
    for path in shards:
        digest = path_digest(path).split(":", 1)[1]
        h.update(f"{os.path.basename(path)}\0{digest}\n".encode())
    return h.hexdigest()


def source_digest(dcfg) -> str:
    """``sha256:<hex>`` of the files the ``data`` section reads: the trace shards (the ones the
    ``regift_traces`` builder is built from, or those of a JSONL path), or the SQuAD-v2 file."""
    if dcfg.kind == "traces":
        shards = (trace_shards() if is_tfds_source(dcfg.source)
                  else rec_lib.resolve_trace_paths(_jsonl_source(dcfg)))
        return "sha256:" + shards_digest(shards)
    if dcfg.kind == "squad_gold":
        return path_digest(squad.squad_source(_squad_dir(dcfg), dcfg.squad_split))
    raise ValueError(f"data.kind={dcfg.kind!r}; valid: traces, squad_gold")


def default_tfds_data_dir(shards: List[str]) -> str:
    """``<cache>/tfds/<digest>``: keyed by the shards' names and contents, so a changed trace set
    is built afresh instead of read from a stale dataset."""
    return os.path.join(cache_dir("tfds"), shards_digest(shards)[:16])


def _check_selection(builder, dcfg) -> None:
    cfg = builder.builder_config
    same_criterion = cfg.selection == "all" or cfg.criterion == dcfg.criterion
    if cfg.selection != dcfg.selection or not same_criterion:
        raise ValueError(
            f"data.source={dcfg.source!r} selects {cfg.selection} traces ({cfg.criterion}) but "
            f"data.selection={dcfg.selection!r}, data.criterion={dcfg.criterion!r}: name the "
            "matching config (e.g. tfds:regift_traces/incorrect, "
            "tfds:regift_traces/correct_strict_em)")


def prepare_regift_traces(config_name: str, data_dir: str = ""):
    """The prepared ``regift_traces/<config_name>`` builder (built now if ``data_dir`` does not
    hold it yet; see the module docstring for the race-safe build)."""
    import tensorflow as tf  # lazy: TensorFlow is heavy and only the tfds: source needs it
    # lazy: the builders import TensorFlow
    from regift_jax.data.builders import RegiftTraces, offline_download_config
    if config_name not in RegiftTraces.builder_configs:
        raise ValueError(f"data.source=tfds:regift_traces/{config_name}: unknown regift_traces "
                         f"config; valid: {', '.join(RegiftTraces.builder_configs)}")
    # TensorFlow only reads files here; it must not claim an accelerator JAX trains on.
    tf.config.set_visible_devices([], "GPU")
    shards = trace_shards()
    data_dir = os.path.abspath(data_dir or default_tfds_data_dir(shards))
    builder = RegiftTraces(config=config_name, source=shards, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build.", dir=data_dir)
    try:
        fresh = RegiftTraces(config=config_name, source=shards, data_dir=tmp)
        fresh.download_and_prepare(download_config=offline_download_config())
        final = os.fspath(builder.data_path)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(os.fspath(fresh.data_path), final)
        except OSError:
            if not os.path.isdir(final):
                raise  # not another process's finished build: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RegiftTraces(config=config_name, source=shards, data_dir=data_dir)


def _tfds_traces(dcfg) -> Tuple[List[dict], dict]:
    _, config_name = parse_tfds_source(dcfg.source)
    builder = prepare_regift_traces(config_name, resolve_path(dcfg.tfds_data_dir))
    _check_selection(builder, dcfg)
    elements, _, _ = load_shard(builder, 0, 1, split="train")
    out = [_example(e) for e in elements]
    report = builder.info.metadata["read_report"]
    log.info("%s: %d examples from %s (built from %d lines: %d records, dropped %s)",
             dcfg.source, len(out), os.fspath(builder.data_path), report["n_lines"],
             report["n_records"], report["dropped"] or "none")
    summary = {"source": dcfg.source, "data_dir": builder.data_dir, "lines": report["n_lines"],
               "records": report["n_records"], "dropped": report["n_dropped"],
               "selected": len(out), "selection": dcfg.selection, "criterion": dcfg.criterion}
    return out, summary


# ============================================================================ held-out split
def split_heldout(examples: List[dict], fraction: float, salt: str = ""
                  ) -> Tuple[List[dict], List[dict]]:
    """(train, heldout): an example is held out iff ``sha256(salt + id)`` / 2**256 <
    ``fraction``; deterministic, independent of order, and every sample of one question id lands
    on the same side."""
    if fraction <= 0:
        return list(examples), []
    train, held = [], []
    for e in examples:
        h = int(hashlib.sha256((salt + str(e["id"])).encode("utf-8")).hexdigest(), 16)
        (held if h < fraction * 2 ** 256 else train).append(e)
    return train, held


def train_and_eval_examples(dcfg) -> Tuple[List[dict], List[dict], dict]:
    """(training examples, held-out examples, source summary): the held-out split by id, then
    the first ``data.max_examples`` training examples when that is > 0."""
    examples, summary = load_examples(dcfg)
    train_ex, eval_ex = split_heldout(examples, float(dcfg.eval_fraction), str(dcfg.eval_salt))
    if int(dcfg.max_examples) > 0:
        train_ex = train_ex[:int(dcfg.max_examples)]
    if not train_ex:
        raise ValueError(f"no training examples left (source summary: {summary})")
    return train_ex, eval_ex, summary
