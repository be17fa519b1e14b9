"""BBQ / StereoSet evaluation from a config: :func:`run` (in-process; the experiment calls it) and
:func:`run_cli` (``python -m regift_jax.evaluate``, which builds the config from its flags).

Four modes; all BBQ modes end in the same judging and jitted scoring path and write the same
``report.json`` / ``report.md`` / ``bbq.png`` (and ``comparison.{md,png}`` with
``report.compare``):

Model modes (``model`` = a preset name, a Hugging Face directory or a ``.gguf`` file; the tasks
are in :mod:`regift_jax.eval.tasks`)::

    python -m regift_jax.evaluate --model=smollm2-135m-instruct --mode=generate \\
        --prompt=bbq_reasoning --categories=Age,Religion --max_items=200 --out=DIR
    python -m regift_jax.evaluate --model=DIR --mode=loglik --prompt=bbq_base --out=DIR
    python -m regift_jax.evaluate --model=DIR --mode=stereoset --out=DIR

``generate`` also writes the answers to ``DIR/generations.jsonl`` (re-scorable in import mode);
``stereoset`` writes ``DIR/stereoset.json`` and ``stereoset.md``.  ``data.max_items`` /
``data.max_items_per_category`` pick a deterministic, balanced subset
(:func:`regift_jax.eval.subset.select_subset`).

Import mode (``generations``): score generations produced elsewhere
(:mod:`regift_jax.eval.generations`)::

    python -m regift_jax.evaluate --generations=FILE --category=Religion --out=DIR \\
        [--bbq_dir=DIR] [--reference_static=evaluation_stats.json] [--compare=OLD/report.json]

Before any model work, :func:`preflight` checks that ``out`` can be written and that
``report.compare`` / ``report.reference_static`` can be read (and :func:`run_model` reads the BBQ
or StereoSet items); a generation run checks its token budget against the model's position limit
before generating.

Flow: read and match generations (problems counted with ``file:line``) or run a model task ->
per-item records (:func:`regift_jax.eval.bbq.judge_items` / ``loglik_records``) ->
:func:`regift_jax.eval.report.build_report` (jitted :mod:`regift_jax.eval.scorer`) ->
:mod:`regift_jax.eval.report` writers.  Bad input is never dropped silently: malformed rows,
unknown example ids, empty generations and BBQ items without a generation are counted in
``report["input"]``; ``judge.strict`` turns the first three into errors.  A duplicate example
id, a context_condition that contradicts the BBQ item, an unknown category or a category without
a data file is an error (:func:`run_cli`: exit status 2 with a one-line message, as for an
output that cannot be written).

With ``--compare`` the report gets ``comparison`` (:mod:`regift_jax.eval.compare`: the paired
cluster bootstrap of every headline change, McNemar on per-item correctness), printed with its
p-values.  Several processes (``jax.distributed``, :mod:`regift_jax.eval.hosts`): each scores its
share of the items, every process builds the whole report, process 0 writes and prints it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict, List, Mapping, Optional

import jax

from regift_jax import models
from regift_jax.core import distributed
from regift_jax.core import prompts as prompts_lib
from regift_jax.core import sharding
from regift_jax.core.io import atomic_write
from regift_jax.data import bbq as bbq_data
from regift_jax.eval import config as config_lib
from regift_jax.eval import hosts
from regift_jax.eval import report as report_lib
from regift_jax.eval import stereoset as ss
from regift_jax.eval.bbq import UNKNOWN_PHRASES, judge_items
from regift_jax.eval.compare import paired_comparison
from regift_jax.eval.config import InputError
from regift_jax.eval.generations import InputCounts, match_generations, read_generations
from regift_jax.eval.subset import add_context_groups, select_subset
from regift_jax.eval.tasks import evaluate_model, stereoset_items, stereoset_report
from regift_jax.models.checkpoints import CheckpointError

#: What :func:`run_cli` reports as a one-line error (exit status 2).
INPUT_ERRORS = (InputError, bbq_data.BBQFormatError, ss.StereoSetFormatError,
                distributed.DistributedConfigError)


def bbq_dir(cfg) -> str:
    """``data.bbq_dir``, else the data root's ``bbq/``; an InputError when there is none."""
    try:
        d = cfg.data.bbq_dir or bbq_data.default_bbq_dir()
    except FileNotFoundError as e:  # REGIFT_DATA_DIR without bbq/
        raise InputError(str(e)) from None
    if not d or not os.path.isdir(d):
        raise InputError(f"{d or 'no data root'}: BBQ directory not found (use --bbq_dir)")
    return d


def _parse_mesh(spec: Optional[str]):
    try:
        # This process's devices: each process scores its own share (regift_jax.eval.hosts).
        return sharding.parse_mesh(spec, jax.local_devices())
    except ValueError as e:
        raise InputError(f"--mesh: {e}") from None


def _load_model(cfg):
    try:
        return models.load(cfg.model, dtype=cfg.runtime.dtype,
                           mesh=_parse_mesh(cfg.runtime.mesh))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise InputError(f"--model={cfg.model}: {e}") from None


def _labels(cfg):
    text = cfg.report.compare_labels
    return tuple(text.split(",", 1)) if "," in text else ("before", "after")


def check_writable(out: str) -> None:
    """Create ``out`` and write (then remove) a probe file in it: a location that cannot take
    the reports fails before any model work, as an :class:`InputError` naming it."""
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"--out={out}: cannot write there ({e.strerror or e})") from None


def _check_readable(path: str, what: str) -> None:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise InputError(f"{path}: {what} not found or not readable")


def preflight(cfg, compare_with: Optional[Mapping]) -> Optional[Mapping]:
    """The checks that need no model, before any model work: the output directory is writable,
    ``report.compare`` / ``report.reference_static`` are readable.
    Returns the report to compare with (read from ``report.compare`` when not given).  Only the
    writing process (0) looks at the files; every process gets its verdict."""
    error = None
    if hosts.is_writer():
        try:
            check_writable(cfg.out)
            if compare_with is None and cfg.report.compare:
                compare_with = report_lib.read_report(cfg.report.compare)
            if cfg.report.reference_static:
                _check_readable(cfg.report.reference_static, "--reference_static file")
        except InputError as e:
            error = str(e)
    hosts.agree(error)
    return compare_with


def _write_bbq(rep: Dict[str, object], cfg, compare_with: Optional[Mapping]) -> Dict[str, object]:
    """Add the paired comparison with ``compare_with``, write report.json / .md / .png (+
    comparison.md / .png) and return ``rep`` with ``files`` (empty on the processes that do not
    write)."""
    rep["files"] = {}
    if not hosts.is_writer():
        return rep
    r = cfg.report
    if compare_with is not None:
        rep["comparison"] = paired_comparison(compare_with, rep, num_resamples=max(
            r.bootstrap_resamples, 1), seed=r.seed, confidence=r.confidence)
    rep["files"] = report_lib.write_all(rep, cfg.out, compare_with=compare_with,
                                        labels=_labels(cfg))
    return rep


def _run_stereoset(cfg) -> Dict[str, object]:
    items = stereoset_items(cfg)  # a missing file fails before the model loads
    rep = stereoset_report(_load_model(cfg), cfg, items=items)
    rep["files"] = {}
    if hosts.is_writer():
        files = {"json": os.path.join(cfg.out, "stereoset.json"),
                 "markdown": os.path.join(cfg.out, "stereoset.md")}
        report_lib.write_json(files["json"], rep)
        atomic_write(files["markdown"], lambda f: f.write(ss.stereoset_markdown(rep)))
        rep["files"] = files
    return rep


def _model_items(cfg) -> Dict[str, List[bbq_data.BBQItem]]:
    """The BBQ items of a model mode: the categories asked for (default: every file present),
    subset per ``data.max_items*``."""
    d = bbq_dir(cfg)
    categories = config_lib.categories(cfg) or bbq_data.available_categories(d)
    if not categories:
        raise InputError(f"no BBQ categories to evaluate (none given, none in {d})")
    try:
        prompts_lib.get_template(cfg.prompt.template)
    except KeyError as e:
        raise InputError(f"--prompt: {e}") from None
    return select_subset(bbq_data.load_bbq(d, categories), cfg.data.max_items,
                         cfg.data.max_items_per_category, cfg.data.subset_seed)


def _write_generations(rep: Dict[str, object], out: str) -> None:
    """Move ``rep["generations"]`` to ``out/generations.jsonl`` (the import mode's schema;
    written by process 0)."""
    path = os.path.join(out, "generations.jsonl")
    rows = rep.pop("generations")
    if hosts.is_writer():
        atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                  for r in rows))
    rep["settings"]["generations_file"] = path


def run_model(cfg, compare_with: Optional[Mapping] = None) -> Dict[str, object]:
    """The model modes (``cfg.model``)."""
    if cfg.generations:
        raise InputError("give either --generations (import mode) or --model, not both")
    if cfg.runtime.batch_size < 1:
        raise InputError("--batch_size must be >= 1")
    if cfg.mode == "stereoset":
        return _run_stereoset(cfg)
    items = _model_items(cfg)
    handle = _load_model(cfg)
    d = cfg.data
    rep = evaluate_model(handle, items, cfg, settings={
        "bbq_dir": os.path.abspath(bbq_dir(cfg)), "max_items": d.max_items,
        "max_items_per_category": d.max_items_per_category, "subset_seed": d.subset_seed})
    rep["input"] = {"n_rows": rep["settings"]["n_items"], "n_malformed_rows": 0,
                    "n_unknown_example_ids": 0, "n_empty_generations": sum(
                        not str(g["generation"]).strip() for g in rep.get("generations", [])),
                    "n_items_without_generation": 0}
    if "generations" in rep:
        _write_generations(rep, cfg.out)
    return _write_bbq(rep, cfg, compare_with)


def run_import(cfg, compare_with: Optional[Mapping] = None) -> Dict[str, object]:
    """Import mode (``cfg.generations``): judge and score generations produced elsewhere."""
    categories = config_lib.categories(cfg)
    if not cfg.data.categories:
        raise InputError("--category is required with --generations")
    if not categories:
        raise InputError("--category is empty")
    d = bbq_dir(cfg)
    items = bbq_data.load_bbq(d, categories)
    counts = InputCounts()
    pairs = match_generations(read_generations(cfg.generations, counts), items, counts)
    if cfg.judge.strict and counts.problems:
        raise InputError(f"--strict: {len(counts.problems)} problem row(s), first: "
                         f"{counts.problems[0]}")
    j = cfg.judge
    records = judge_items(pairs, tie_break=j.tie_break, overlap_threshold=j.overlap_threshold,
                          letter_options=j.letter_options)
    add_context_groups(records, [it for c in categories for it in items[c]])
    settings = {"generations": os.path.abspath(cfg.generations), "bbq_dir": os.path.abspath(d),
                "tie_break": j.tie_break, "letter_options": j.letter_options,
                "overlap_threshold": j.overlap_threshold,
                "unknown_phrases": list(UNKNOWN_PHRASES)}
    r = cfg.report
    rep = report_lib.build_report(
        records, categories, num_resamples=r.bootstrap_resamples, seed=r.seed,
        confidence=r.confidence, settings=settings, input_counts=counts.summary(),
        title=r.title or f"BBQ {', '.join(categories)}: {os.path.basename(cfg.generations)}")
    if r.reference_static and hosts.is_writer():
        rep["reference_agreement"] = report_lib.reference_agreement(records, r.reference_static)
    return _write_bbq(rep, cfg, compare_with)


def run(cfg, compare_with: Optional[Mapping] = None) -> Dict[str, object]:
    """Evaluate per ``cfg`` (:func:`regift_jax.eval.config.base_config`) and write the reports
    to ``cfg.out``; returns the report dict (``files`` lists what was written).
    ``compare_with``: an earlier report dict to compare with (instead of ``report.compare``).
    Under ``jax.distributed`` every process scores its share and returns the whole report;
    process 0 writes the files."""
    config_lib.check(cfg)
    if not cfg.out:
        raise InputError("--out (config key out) is required")
    if not 0.0 < cfg.report.confidence < 1.0:
        raise InputError(f"--confidence must be in (0, 1), got {cfg.report.confidence}")
    if cfg.report.bootstrap_resamples < 0:
        raise InputError("--bootstrap_resamples must be >= 0")
    compare_with = preflight(cfg, compare_with)
    if cfg.model:
        return run_model(cfg, compare_with)
    if not cfg.generations:
        raise InputError("give --generations=FILE (import mode) or --model=... (model modes)")
    return run_import(cfg, compare_with)


# --------------------------------------------------------------------------------------------
# Console output
# --------------------------------------------------------------------------------------------

def print_summary(rep: Mapping[str, object]) -> None:
    """The headline of a BBQ report: one line per category, the input counts, the speed."""
    m = rep["metrics"]
    fmt = lambda v: "nan" if v is None or v != v else f"{100 * v:.2f}"  # noqa: E731
    for c in list(rep["categories"]) + ["total"]:
        r = m[c]
        print(f"{c}: n={r['n_total']} accuracy={fmt(r['acc_overall'])}% "
              f"(ambig {fmt(r['acc_ambig'])}, disambig {fmt(r['acc_disambig'])}) "
              f"paper_exact_match={fmt(r['paper_acc_overall'])}% "
              f"unparseable={fmt(r['unparseable_rate_overall'])}% "
              f"s_DIS={fmt(r['s_dis'])} s_AMB={fmt(r['s_amb'])}")
    if report_lib.cut_off_line(rep):
        print(report_lib.cut_off_line(rep))
    _print_changes(rep.get("comparison"))
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
    s = rep.get("settings", {})
    if "items_per_second" in s:
        print(f"{s.get('mode')}: {s['n_items']} items in {s['seconds']:.1f} s "
              f"({s['items_per_second']:.2f} items/s)")


def _print_changes(comparison: Optional[Mapping]) -> None:
    """The total's change of every headline metric with its paired p-value."""
    total = (comparison or {}).get("metrics", {}).get(report_lib.TOTAL)
    if not total:
        return
    parts = [f"{k} {100 * t['diff']:+.2f} (p={t['p_value']:.2f})" for k, t in total.items()
             if t["diff"] == t["diff"] and t["p_value"] == t["p_value"]]
    print(f"change vs {comparison['n_paired']} paired items (x100, paired cluster bootstrap): "
          + ", ".join(parts))


def _print_stereoset(rep: Mapping[str, object]) -> None:
    for name, m in (("per-token mean", rep["metrics"]), ("sum", rep["metrics_sum"])):
        o = m["overall"]
        print(f"StereoSet ({name}): n={o['count']} LM={o['lm_score']:.2f} "
              f"SS={o['ss_score']:.2f} ICAT={o['icat_score']:.2f}")
    print(f"wrote {rep['files']['json']}")


def run_cli(cfg) -> int:
    """:func:`run` with console output (process 0): 0, or 2 with a one-line error for bad input
    or an output that cannot be written.  Initialises ``jax.distributed`` first when
    ``cfg.distributed`` asks for it (:mod:`regift_jax.core.distributed`)."""
    try:
        distributed.maybe_initialize_distributed(cfg.distributed)
        rep = run(cfg)
    except INPUT_ERRORS + (OSError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not hosts.is_writer():
        return 0
    if rep.get("schema") == ss.REPORT_SCHEMA:
        _print_stereoset(rep)
        return 0
    print_summary(rep)
    return 0
