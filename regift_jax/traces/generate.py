"""Offline teacher trace generation (command line: :mod:`regift_jax.generate_traces`).

ReGiFT step 1: a reasoning teacher answers SQuAD-v2 questions as ``<think>R</think>`` followed by
the answer (inside ``<answer>`` tags, or, as R1-distilled models write it for the authors'
prompt, as plain text after ``</think>``); the trace keeps both correctness judgements and the
``regift_traces`` builder selects the correct ones.

Work units are ``(question, sample_index)`` pairs over the configured SQuAD questions (default:
the dev ``pool`` split; ``data.split="train"`` or ``data.squad_file`` for SQuAD-v2 train, see
:func:`regift_jax.data.squad.load_split`), in a fixed order.  Process ``k`` of ``P`` takes units
``k, k+P, ...`` and writes its own files, so a pod generates in parallel with no coordination
beyond JAX's (each process uses its first local device).  ``teacher.mesh`` (``"fsdp=-1,tensor=8"``;
the evaluator's ``--mesh`` syntax) instead shards one teacher over every device of the slice with
the training rules (:mod:`regift_jax.core.sharding`): on several hosts every process then runs the
same batches in lockstep (the sampler's lockstep mode) and process 0 alone reads the done units,
writes the files and the summary, as one stream of units (``processes`` 1 in the manifest).

Resumable and safe: every batch of records is written to its own file atomically (temp + rename)
under ``out_dir/parts/``; a restarted run reads the keys already written and skips them, so a run
killed at any moment (SIGKILL included) and restarted produces every unit exactly once.  A line
that cannot be read back (a corrupt part line, the cut tail of a truncated ``.jsonl.gz``) is
counted with ``file:line`` and its unit generated again.  When all units of a process are done,
its parts are compacted into ``traces-pNNNNN.jsonl.gz`` (gzip: the records of one paragraph
repeat its context; written atomically first; leftover parts already contained in it are deleted
on the next start); compaction reads through the same counting reader, so a bad line never stops
it.

Identity (``manifest.json``): what the trace set is made of — the teacher's content fingerprint
(:mod:`regift_jax.models.fingerprint`) and its label (derived from the model; a typed
``teacher.name`` must name that model), the data selection (SQuAD source file and its sha256,
split, seed, ``max_questions``, ``answerable_fraction``, ``num_samples``, the number of units),
the prompt and every decoding setting, the process count and the trace schema.  A resume whose
identity differs is refused with one line per difference (``key: old -> new``), unless
``resume_override=True``, which is then recorded in the manifest with the differences.  Batch
size, length bucket and cache length are recorded (``runtime``) but not compared: rows are
independent and each unit has its own seed.

The teacher prompt (``teacher_extraction`` with its prefill, chat-wrapped only with
``teacher.chat``) gets the tokenizer's BOS when the tokenizer adds one, by the one rule shared with
training and evaluation (:func:`regift_jax.core.prompts.encode_prompt`; the authors' script
tokenised the prompt with the tokenizer's defaults, which for R1-Distill-Qwen adds its BOS).

Decoding (``decode.mode``):

* ``single`` (the paper): one generation from the prompt + teacher prefill, stopping at
  ``</answer>`` (or EOS / the token budget: an output that ends inside ``<think>`` is dropped
  on read as ``unfinished <think>``).
* ``two_phase`` (for small teachers that do not reliably close their tags): phase 1 generates the
  reasoning and stops at ``</think>``/``<answer>`` or ``max_reasoning_tokens``; the harness then
  closes the scaffold (``</think>\\n<answer>``) and phase 2 generates the answer until
  ``</answer>``.  Both phases are the teacher's own tokens; the inserted tags are recorded in the
  prompt version (``...+two_phase``).

At the end a summary (every line's outcome: kept by ``answer_source`` or dropped by reason; yield
by answerable/unanswerable; reasoning length of correct vs incorrect traces, as the paper's
Figure 4) is printed and written to ``summary.json`` and ``summary.png``.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import random
import re
import sys
import time
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from regift_jax import models
from regift_jax.core import configs_util, distributed, prompts, sharding
from regift_jax.core.io import (LineCounts, atomic_write, atomic_write_json, atomic_write_text,
                                iter_jsonl)
from regift_jax.core.paths import default_source_dir
from regift_jax.data import squad
from regift_jax.data.records import (ANSWER_CLOSE, ANSWER_OPEN, ANSWER_SOURCES, SCHEMA_VERSION,
                                     THINK_CLOSE, ReadReport, TraceRecord, parse_output,
                                     read_trace_jsonl, write_trace_jsonl)
from regift_jax.models.fingerprint import ModelIdentity, describe_model, path_digest
from regift_jax.models.sampling import Continuation, SamplingConfig
from regift_jax.traces.judge import judge

DECODE_MODES = ("single", "two_phase")
# The teacher prompt's last line before the question: rows of one paragraph share everything up
# to it, which the sampler prefills once per batch.
_QUESTION_MARKER = "Question:\n"
# Counted by the part-file readers for a JSON object without a usable unit key.
_NO_UNIT_KEY = "no_unit_key"


# ------------------------------------------------------------------------------------------------
# Work: the questions and the units still to generate
# ------------------------------------------------------------------------------------------------


class TraceConfigError(ValueError):
    """A run that must not start as configured (its command line prints it as one line)."""


def squad_path(cfg) -> str:
    """The SQuAD-v2 file (or saved Hugging Face directory) the configured split is read from."""
    d = cfg.data
    if d.squad_file:
        return squad.squad_source("", d.split, d.squad_file)
    src = d.squad_dir or default_source_dir("squad_v2")
    if not src:
        raise FileNotFoundError("no SQuAD-v2 directory: set --config.data.squad_dir (or "
                                "--config.data.squad_file)")
    return squad.squad_source(src, d.split)


def load_questions(cfg, path: Optional[str] = None) -> List[dict]:
    """The configured SQuAD-v2 questions in unit order: ``data.split`` of :func:`squad_path`
    (or ``path``), then (when ``data.max_questions`` or ``data.answerable_fraction`` asks for it)
    a seeded subsample."""
    d = cfg.data
    rows = squad.load_split("", d.split, d.num_buckets, d.pool_buckets,
                            squad_file=path or squad_path(cfg))
    if d.max_questions > 0 or d.answerable_fraction >= 0:
        rows = _subsample_paragraphs(rows, d.max_questions, d.answerable_fraction, d.seed)
    return rows


def _subsample_paragraphs(rows: List[dict], max_questions: int, answerable_fraction: float,
                          seed: int) -> List[dict]:
    """Whole paragraphs in a seeded order (questions of one paragraph share the prompt prefix,
    which the sampler prefills once); within them every answerable question and a seeded share of
    unanswerable ones so that about ``answerable_fraction`` of the kept questions are answerable
    (negative: keep the natural mix); at most ``max_questions`` (0: no limit)."""
    rnd = random.Random(seed)
    paras: Dict[str, List[dict]] = {}
    for r in rows:
        paras.setdefault(r["context"], []).append(r)
    keys = sorted(paras)
    rnd.shuffle(keys)
    frac = answerable_fraction
    n_ans = sum(not r["is_impossible"] for r in rows)
    n_una = len(rows) - n_ans
    p_una = 1.0 if frac < 0 or n_una == 0 else min(1.0, n_ans * (1 - frac) / frac / n_una)
    out = []
    limit = max_questions if max_questions > 0 else len(rows)
    for k in keys:
        for r in paras[k]:
            if r["is_impossible"] and rnd.random() >= p_una:
                continue
            out.append(r)
        if len(out) >= limit:
            break
    return out[:limit]


def unit_seed(qid: str, sample_index: int) -> int:
    return zlib.crc32(f"{qid}/{sample_index}".encode()) & 0x7FFFFFFF


def _finals(out_dir: str, proc: int) -> List[str]:
    """This process's compacted shard(s): ``.jsonl.gz``, and a plain ``.jsonl`` of older runs."""
    base = os.path.join(out_dir, f"traces-p{proc:05d}.jsonl")
    return [p for p in (base + ".gz", base) if os.path.exists(p)]


def _parts(out_dir: str, proc: int) -> List[str]:
    return sorted(glob.glob(os.path.join(out_dir, "parts", f"p{proc:05d}-*.jsonl")))


def _part_path(out_dir: str, proc: int, part_no: int) -> str:
    return os.path.join(out_dir, "parts", f"p{proc:05d}-{part_no:06d}.jsonl")


def _next_part_no(out_dir: str, proc: int) -> int:
    return 1 + max([int(os.path.basename(p)[7:13]) for p in _parts(out_dir, proc)] or [0])


def _unit_records(path: str, counts: LineCounts) -> Iterator[Tuple[tuple, dict]]:
    """``((id, sample_index), record)`` for every readable line of a shard or part file; the other
    lines are counted in ``counts`` (by :func:`regift_jax.core.io.iter_jsonl`, or here when the
    object has no string ``id`` / integer ``sample_index``)."""
    for lineno, obj in iter_jsonl(path, counts):
        qid, s = obj.get("id"), obj.get("sample_index")
        if not isinstance(qid, str) or not isinstance(s, int) or isinstance(s, bool):
            counts.skip(_NO_UNIT_KEY, f"{path}:{lineno}", "no string id / integer sample_index")
            continue
        yield (qid, s), obj


def _warn_skipped(counts: LineCounts, consequence: str) -> None:
    if counts.n_skipped:
        logging.warning("unreadable trace lines (%s): %s", consequence, counts.summary())


def _read_done(out_dir: str, proc: int) -> Set[tuple]:
    """Units already written by this process (compacted file + parts)."""
    counts = LineCounts()
    done = set()
    for path in _finals(out_dir, proc) + _parts(out_dir, proc):
        done.update(key for key, _ in _unit_records(path, counts))
    _warn_skipped(counts, "their units are generated again")
    return done


def _compact(out_dir: str, proc: int) -> None:
    """Fold this process's parts (and an older plain shard) into ``traces-pNNNNN.jsonl.gz``, each
    unit once, then delete what was folded in."""
    parts = _parts(out_dir, proc)
    olds = _finals(out_dir, proc)
    final = os.path.join(out_dir, f"traces-p{proc:05d}.jsonl.gz")
    if not parts and olds == [final]:
        return
    counts = LineCounts()
    seen: Set[tuple] = set()
    lines = []
    for path in olds + parts:
        for key, obj in _unit_records(path, counts):
            if key not in seen:
                seen.add(key)
                lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    _warn_skipped(counts, "left out of the compacted shard")
    atomic_write(final, lambda f: _write_gzip(f, lines), mode="wb")
    for p in parts + [o for o in olds if o != final]:
        os.remove(p)


def _write_gzip(raw, lines: Sequence[str]) -> None:
    # mtime 0 and no file name: the same records give the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write("".join(lines).encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Settings: prompt, decoding, manifest
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run generates: the prompt template and the sampling settings of each phase."""
    template: prompts.Template
    prompt_version: str
    two_phase: bool
    sampling: SamplingConfig  # the whole generation (``single``), or the two phases' budget
    reasoning: SamplingConfig  # ``two_phase``: phase 1, stops at </think> or <answer>
    answer: SamplingConfig  # ``two_phase``: phase 2, stops at </answer>

    @property
    def decoding(self) -> dict:
        sc = self.sampling
        return {"temperature": sc.temperature, "top_p": sc.top_p, "top_k": sc.top_k,
                "max_new_tokens": sc.max_new_tokens, "seed": sc.seed}


def make_plan(cfg) -> Plan:
    tmpl = prompts.get_template(cfg.prompt.template, cfg.prompt.version or None)
    if cfg.prompt.prefill is not None:
        tmpl = tmpl.with_prefill(cfg.prompt.prefill)
    d = cfg.decode
    if d.mode not in DECODE_MODES:
        raise ValueError(f"decode.mode must be single or two_phase, got {d.mode!r}")
    two_phase = d.mode == "two_phase"
    max_new = d.max_reasoning_tokens + d.max_answer_tokens if two_phase else d.max_new_tokens
    sc = SamplingConfig(max_new_tokens=max_new, temperature=d.temperature, top_p=d.top_p,
                        top_k=d.top_k, stop_strings=(ANSWER_CLOSE,), seed=d.seed)
    return Plan(template=tmpl, prompt_version=tmpl.id + ("+two_phase" if two_phase else ""),
                two_phase=two_phase, sampling=sc,
                reasoning=dataclasses.replace(sc, max_new_tokens=d.max_reasoning_tokens,
                                              stop_strings=(THINK_CLOSE, ANSWER_OPEN)),
                answer=dataclasses.replace(sc, max_new_tokens=d.max_answer_tokens,
                                           seed=sc.seed + 1))


# The manifest keys a resume must match (nested dicts compare key by key).
IDENTITY_KEYS = (
    "teacher", "teacher_fingerprint", "teacher_dtype", "prompt_version", "prefill", "chat",
    "mode", "decoding", "max_reasoning_tokens", "max_answer_tokens", "num_samples",
    "squad_source", "squad_sha256", "split", "num_buckets", "pool_buckets", "data_seed",
    "max_questions", "answerable_fraction", "units_configured", "processes", "trace_schema")


class _NotRecorded:
    """A key an older manifest lacks (shown, and stored in ``resume_overrides``, as text)."""

    def __repr__(self) -> str:
        return "(not recorded)"

    __str__ = __repr__


_NOT_RECORDED = _NotRecorded()


def _model_stem(ident: ModelIdentity) -> str:
    base = ident.label.rsplit("/", 1)[-1]
    return base.split(".")[0] if ident.kind == "gguf" else base


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def teacher_identity(cfg) -> ModelIdentity:
    """The teacher's fingerprint and label: derived from the model, or a typed ``teacher.name``
    that names it (contains its file or repository name, ignoring case and punctuation)."""
    ident = describe_model(cfg.teacher.model)
    typed = (cfg.teacher.name or "").strip()
    if typed and _squash(_model_stem(ident)) not in _squash(typed):
        raise TraceConfigError(
            f"teacher.name={typed!r} does not name the model {ident.path} ({ident.label}); leave "
            "teacher.name empty to use the model's own label, or give one that contains "
            f"{_model_stem(ident)!r}")
    return dataclasses.replace(ident, label=typed or ident.label)


def data_identity(cfg, path: str) -> dict:
    """The data selection: which SQuAD-v2 file (name and content) and which of its questions."""
    d = cfg.data
    return {"squad_source": os.path.basename(os.path.normpath(path)),
            "squad_sha256": path_digest(path), "split": str(d.split),
            "num_buckets": int(d.num_buckets), "pool_buckets": int(d.pool_buckets),
            "data_seed": int(d.seed), "max_questions": int(d.max_questions),
            "answerable_fraction": float(d.answerable_fraction)}


def make_manifest(cfg, plan: Plan, teacher: ModelIdentity, data: dict, units: int,
                  processes: int) -> dict:
    """What a trace set is (``manifest.json``): :data:`IDENTITY_KEYS` plus where the teacher
    was read from and the runtime settings that do not change outputs."""
    d = cfg.decode
    return {
        "manifest_version": 2, "teacher": teacher.label, "teacher_fingerprint": teacher.fingerprint,
        "teacher_dtype": str(cfg.teacher.dtype), "prompt_version": plan.prompt_version,
        "prefill": plan.template.prefill, "chat": bool(cfg.teacher.chat), "mode": str(d.mode),
        "decoding": plan.decoding, "max_reasoning_tokens": int(d.max_reasoning_tokens),
        "max_answer_tokens": int(d.max_answer_tokens), "num_samples": int(cfg.num_samples),
        **data, "units_configured": int(units), "processes": int(processes),
        "trace_schema": SCHEMA_VERSION,
        "teacher_model": str(cfg.teacher.model), "teacher_path": os.path.abspath(teacher.path),
        "runtime": {"batch_size": int(cfg.batch_size), "length_bucket": int(cfg.length_bucket),
                    "cache_len": int(cfg.cache_len), "chunk": int(d.chunk),
                    "xla_cpu_flags": str(cfg.xla_cpu_flags)},
    }


def manifest_differences(old: dict, new: dict) -> Dict[str, tuple]:
    """``{key: (old, new)}`` over :data:`IDENTITY_KEYS` (a key an older manifest lacks is
    ``(not recorded)``)."""
    o = configs_util.flatten({k: old[k] for k in IDENTITY_KEYS if k in old})
    n = configs_util.flatten(
        json.loads(json.dumps({k: new[k] for k in IDENTITY_KEYS if k in new})))
    keys = list(n) + [k for k in o if k not in n]
    return {k: (o.get(k, _NOT_RECORDED), n.get(k, _NOT_RECORDED)) for k in keys
            if o.get(k, _NOT_RECORDED) != n.get(k, _NOT_RECORDED)}


def read_manifest(out_dir: str) -> Optional[dict]:
    """The stored manifest, ``None`` when there is none."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TraceConfigError(f"{path} is not a readable manifest ({e}); restore it or use a "
                               "new out_dir") from None
    if not isinstance(old, dict):
        raise TraceConfigError(f"{path} is not a manifest (a JSON {type(old).__name__})")
    return old


def check_manifest(out_dir: str, manifest: dict, override: bool = False,
                   write: bool = True) -> dict:
    """The manifest the run continues under: ``manifest`` for a new ``out_dir`` (written when
    ``write``), the stored one when they agree, else a :class:`TraceConfigError` listing each
    difference — or, with ``override``, ``manifest`` with the differences recorded."""
    old = read_manifest(out_dir)
    diffs = {} if old is None else manifest_differences(old, manifest)
    if old is not None and not diffs:
        return old
    if diffs and not override:
        lines = "".join(f"\n  {k}: {o!r} -> {n!r}" for k, (o, n) in diffs.items())
        raise TraceConfigError(
            f"{out_dir} holds traces made with other settings:{lines}\nresume with the same "
            "config, use a new out_dir, or pass --config.resume_override=True to add to this "
            "trace set anyway (the differences are then recorded in its manifest.json)")
    if diffs:
        logging.warning("resume_override: continuing %s despite %d difference(s): %s", out_dir,
                        len(diffs), ", ".join(diffs))
        history = list(old.get("resume_overrides", []))
        manifest = dict(manifest, resume_overrides=history + [
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "differences": json.loads(json.dumps(diffs, default=str))}])
    if write:
        atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest, indent=2)
    return manifest


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def _paragraph_batches(questions: List[dict], todo: List[tuple], batch_size: int) -> List[list]:
    """The remaining units grouped by paragraph (shared prompt prefix), in unit order."""
    groups: Dict[str, List[tuple]] = {}
    for u in todo:
        groups.setdefault(questions[u[0]]["context"], []).append(u)
    return [us[b:b + batch_size] for us in groups.values() for b in range(0, len(us), batch_size)]


def _shared_prefix(full: List[str], question: str) -> Optional[str]:
    """The first prompt up to its question's marker line, when every prompt starts with it."""
    cut = full[0].rfind(_QUESTION_MARKER, 0, full[0].rfind(question) + 1)
    if cut < 0:
        return None
    prefix = full[0][:cut + len(_QUESTION_MARKER)]
    return prefix if all(f.startswith(prefix) for f in full) else None


def _teacher_inputs(tok, full: List[str], question: str):
    """``(prompts, prefix)`` for the sampler: the shared prefix split off as text, and the
    tokenizer's BOS in front of the sequence by the one rule of
    :func:`regift_jax.core.prompts.encode_prompt` (on the prefix when there is one)."""
    bos = prompts.bos_id(tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = _shared_prefix(full, question)
    if prefix:
        return [f[len(prefix):] for f in full], prompts.with_bos(enc(prefix), bos)
    return [prompts.with_bos(enc(f), bos) for f in full], None


def _bridge(texts: List[str]) -> List[str]:
    """Close the reasoning scaffold after phase 1, whichever way phase 1 ended."""
    out = []
    for t in texts:
        if t.endswith(ANSWER_OPEN):
            out.append("")
        elif t.endswith(THINK_CLOSE):
            out.append("\n" + ANSWER_OPEN)
        else:
            out.append("\n" + THINK_CLOSE + "\n" + ANSWER_OPEN)
    return out


def _sample(sampler, plan: Plan, ptexts: list, seeds: List[int],
            prefix: Optional[List[int]]) -> List[Tuple[str, int, int]]:
    """``(text, generated tokens, prompt tokens)`` per row."""
    if not plan.two_phase:
        gens = sampler.generate(ptexts, plan.sampling, row_seeds=seeds, prefix=prefix)
        return [(g.text, g.generated_tokens, g.prompt_tokens) for g in gens]
    gens = sampler.generate(ptexts, plan.reasoning, row_seeds=seeds, prefix=prefix,
                            then=Continuation(_bridge, plan.answer))
    # an answer that ran out of budget is closed by the harness
    return [(g.text if ANSWER_CLOSE in g.text else g.text.rstrip() + " " + ANSWER_CLOSE,
             g.generated_tokens, g.prompt_tokens) for g in gens]


def make_record(q: dict, sample_index: int, gen: Tuple[str, int, int], plan: Plan,
                teacher: str, tok) -> TraceRecord:
    """One judged trace from one generation for question ``q``."""
    text, n_gen, n_prompt = gen
    raw = prompts.restore_prefill(plan.template, text)
    parsed = parse_output(raw, prefilled_think=True)
    golds = [a["text"] if isinstance(a, dict) else a for a in q["answers"]]
    j = judge(parsed.answer, golds)
    return TraceRecord(
        id=q["id"], context=q["context"], question=q["question"], gold_answers=golds,
        is_impossible=bool(q["is_impossible"]), teacher=teacher,
        prompt_version=plan.prompt_version, decoding=plan.decoding, sample_index=int(sample_index),
        raw_generation=raw, reasoning=parsed.reasoning, answer=parsed.answer,
        exact_match=float(j.exact_match), f1=float(j.f1), lenient_correct=bool(j.lenient_correct),
        reasoning_tokens=len(tok(parsed.reasoning, add_special_tokens=False)["input_ids"]),
        prompt_tokens=int(n_prompt), generated_tokens=int(n_gen),
        answer_source=parsed.answer_source)


def _generate_units(cfg, plan: Plan, handle, teacher: str, questions: List[dict],
                    todo: List[tuple], proc: int, bar, write: bool = True) -> None:
    """Generate ``todo`` batch by batch, one atomically written part file per batch (``write``
    False: a lockstep process that only computes)."""
    tok = handle.tokenizer
    sampler = handle.sampler(batch_size=cfg.batch_size, length_bucket=cfg.length_bucket,
                             chunk=cfg.decode.chunk, cache_len=cfg.cache_len or None)
    part_no = _next_part_no(cfg.out_dir, proc)
    n_ok = n_total = 0
    t_start = time.time()
    for chunk in _paragraph_batches(questions, todo, cfg.batch_size):
        qs = [questions[qi] for qi, _ in chunk]
        full = [prompts.render_for_model(plan.template, tok, chat=cfg.teacher.chat,
                                         context=q["context"], question=q["question"])
                for q in qs]
        ptexts, prefix = _teacher_inputs(tok, full, qs[0]["question"])
        seeds = [unit_seed(q["id"], s) for q, (_, s) in zip(qs, chunk)]
        gens = _sample(sampler, plan, ptexts, seeds, prefix)
        recs = [make_record(q, s, g, plan, teacher, tok)
                for q, (_, s), g in zip(qs, chunk, gens)]
        if write:
            write_trace_jsonl(_part_path(cfg.out_dir, proc, part_no), recs)
        part_no += 1
        n_ok += sum(r.lenient_correct for r in recs)
        n_total += len(recs)
        bar.update(len(chunk))
        el = time.time() - t_start
        bar.set_postfix(traces_per_s=f"{n_total / el:.2f}", yield_=f"{n_ok / max(1, n_total):.1%}")


def _maybe_init_distributed(cfg) -> None:
    """``jax.distributed.initialize`` on a multi-host TPU slice or with ``JAX_COORDINATOR_ADDRESS``
    (and ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), the training command line's rule."""
    distributed.maybe_initialize_distributed(ml_collections.ConfigDict(dict(
        initialize="never" if cfg.distributed == "off" else "auto", coordinator_address="",
        num_processes=-1, process_id=-1, initialization_timeout=300)))


def teacher_mesh(cfg):
    """The teacher's mesh (``teacher.mesh``) over every device of every process, or None ("":
    each process loads its own unsharded copy)."""
    try:
        return sharding.parse_mesh(cfg.teacher.get("mesh") or "", jax.devices())
    except ValueError as e:
        raise TraceConfigError(f"teacher.mesh: {e}") from None


def _todo(cfg, questions: List[dict], mine: List[tuple], stream: int,
          lockstep: bool) -> List[tuple]:
    """The units of ``mine`` not written yet.  In lockstep only process 0 reads its files (the
    others may not share its disk) and sends every process the same list."""
    done = set() if lockstep and jax.process_index() else _read_done(cfg.out_dir, stream)
    keep = np.array([(questions[qi]["id"], s) not in done for qi, s in mine], bool)
    if lockstep:
        keep = np.asarray(multihost_utils.broadcast_one_to_all(keep))
    return [u for u, k in zip(mine, keep) if k]


def _stored_manifest(out_dir: str) -> dict:
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise TraceConfigError(f"{out_dir} has no manifest.json: nothing was generated there "
                               "yet (finalize_only compacts and summarises an existing run)")
    return manifest


def prepare(cfg, plan: Plan, proc: int,
            nproc: int) -> Tuple[List[dict], ModelIdentity, dict]:
    """Questions, teacher identity and the manifest the run continues under (checked against a
    stored one before any model is loaded; process 0 writes it)."""
    path = squad_path(cfg)
    questions = load_questions(cfg, path)
    teacher = teacher_identity(cfg)
    manifest = make_manifest(cfg, plan, teacher, data_identity(cfg, path),
                             len(questions) * int(cfg.num_samples), nproc)
    manifest = check_manifest(cfg.out_dir, manifest, bool(cfg.resume_override),
                              write=proc == 0)
    return questions, teacher, manifest


def run(cfg) -> dict:
    """Generate (or, with ``finalize_only``, only compact and summarise) the configured traces;
    returns the summary (process 0) or this process's read report."""
    configs_util.apply_xla_cpu_flags(cfg.xla_cpu_flags)  # before JAX starts
    _maybe_init_distributed(cfg)
    proc, nproc = jax.process_index(), jax.process_count()
    mesh = None
    os.makedirs(os.path.join(cfg.out_dir, "parts"), exist_ok=True)
    try:  # bad settings and bad source files are the user's to fix: one line, no traceback
        plan = make_plan(cfg)
        if cfg.finalize_only:
            manifest = _stored_manifest(cfg.out_dir)
        else:
            mesh = teacher_mesh(cfg)  # a bad mesh fails before the data is read
            lockstep = mesh is not None and nproc > 1
            # stream: whose units and files this process works on (lockstep: one stream, 0)
            stream, nstreams = (0, 1) if lockstep else (proc, nproc)
            questions, teacher, manifest = prepare(cfg, plan, proc, nstreams)
    except TraceConfigError:
        raise
    except ValueError as e:
        raise TraceConfigError(str(e)) from e
    if cfg.finalize_only:
        # Compact what has been generated so far and write the summary / data card, without
        # loading the teacher: a partial set is usable and a later run resumes it.
        return _finish(cfg, proc, manifest, time.time())
    units = [(qi, s) for qi in range(len(questions)) for s in range(cfg.num_samples)]
    mine = units[stream::nstreams]
    todo = _todo(cfg, questions, mine, stream, lockstep)
    logging.info("process %d/%d%s: %d units, %d already done, %d to do", proc, nproc,
                 " (lockstep)" if lockstep else "", len(mine), len(mine) - len(todo), len(todo))
    t0 = time.time()
    # weights in the compute dtype: a 32B teacher in bfloat16 is 61 GiB, in float32 122
    handle = models.load(teacher.path, dtype=cfg.teacher.dtype, param_dtype=cfg.teacher.dtype,
                         mesh=mesh)
    logging.info("teacher %s (%s) loaded in %.1fs", teacher.label, teacher.fingerprint,
                 time.time() - t0)
    write = proc == stream  # lockstep: process 0 writes, the others only compute
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"traces p{stream}",
               unit="trace", dynamic_ncols=True, disable=not (cfg.progress and write))
    _generate_units(cfg, plan, handle, teacher.label, questions, todo, stream, bar, write)
    bar.close()
    if not write:
        return {"read_report": {}}
    return _finish(cfg, proc, manifest, t0,
                   hardware=f"{jax.device_count()} x {jax.devices()[0].device_kind}")


# ------------------------------------------------------------------------------------------------
# Summary and data card
# ------------------------------------------------------------------------------------------------


def _reasoning_lengths(records: List[dict]) -> Dict[str, List[int]]:
    return {k: [r["reasoning_tokens"] for r in records if bool(r["lenient_correct"]) == v]
            for k, v in (("correct", True), ("incorrect", False))}


def _yields(records: List[dict]) -> dict:
    """Yield (paper-lenient and strict EM) by answerable/unanswerable."""
    out = {}
    for name, crit in (("lenient", lambda r: r["lenient_correct"]),
                       ("strict_em", lambda r: r["exact_match"] >= 1.0)):
        d = {}
        for grp, sel in (("all", lambda r: True), ("answerable", lambda r: not r["is_impossible"]),
                         ("unanswerable", lambda r: r["is_impossible"])):
            rs = [r for r in records if sel(r)]
            d[grp] = {"n": len(rs), "correct": sum(bool(crit(r)) for r in rs),
                      "yield": (sum(bool(crit(r)) for r in rs) / len(rs)) if rs else None}
        out[f"yield_{name}"] = d
    return out


def outcomes(records: List[dict], report: Optional[ReadReport]) -> dict:
    """Every line read, once: kept, by ``answer_source`` (with its lenient-correct count), or
    dropped, by reason (``unfinished <think>``: the output ended inside its reasoning)."""
    kept = {src: {"n": sum(r.get("answer_source") == src for r in records),
                  "correct": sum(r.get("answer_source") == src and bool(r["lenient_correct"])
                                 for r in records)} for src in ANSWER_SOURCES}
    dropped = dict(sorted(report.dropped.items())) if report is not None else {}
    return {"lines": len(records) + sum(dropped.values()), "kept": kept, "dropped": dropped}


def summarize(records: List[dict], wall_s: float,
              report: Optional[ReadReport] = None) -> dict:
    """Outcome of every line, yield (paper-lenient and strict EM) by answerable/unanswerable,
    and reasoning length of correct vs incorrect traces."""
    s = {"wall_time_s": round(wall_s, 1), "records": len(records),
         "outcomes": outcomes(records, report), **_yields(records)}
    s["reasoning_tokens"] = {k: {"n": len(v), "mean": float(np.mean(v)) if v else None,
                                 "median": float(np.median(v)) if v else None}
                             for k, v in _reasoning_lengths(records).items()}
    s["questions_with_a_correct_trace"] = len({r["id"] for r in records if r["lenient_correct"]})
    return s


def plot_summary(records: List[dict], summary: dict, path: str) -> None:
    """Reasoning length by correctness (cf. paper Fig. 4) and the yield, as one PNG."""
    lens = _reasoning_lengths(records)
    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots(1, 2)
    bins = np.linspace(0, max([1] + lens["correct"] + lens["incorrect"]), 30)
    for k, c in (("correct", "tab:green"), ("incorrect", "tab:red")):
        if lens[k]:
            ax[0].hist(lens[k], bins=bins, alpha=0.6, color=c, label=f"{k} (n={len(lens[k])})",
                       density=True)
    ax[0].set_xlabel("reasoning tokens")
    ax[0].set_title("Reasoning length by correctness (cf. paper Fig. 4)")
    ax[0].legend()
    y = summary["yield_lenient"]
    groups = ["answerable", "unanswerable", "all"]
    ax[1].bar(groups, [100 * (y[g]["yield"] or 0) for g in groups], color="tab:blue")
    ax[1].set_ylabel("% correct (paper-lenient)")
    ax[1].set_title("Trace yield")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _run_facts(cfg, out_dir: str, hardware: str, report: ReadReport, manifest: dict) -> dict:
    """Wall time since the first start, hardware and progress, for the summary and data card."""
    s = {}
    finals = glob.glob(os.path.join(out_dir, "traces-p*.jsonl*"))
    man = os.path.join(out_dir, "manifest.json")
    if cfg.wall_time_s > 0:  # measured elsewhere (files were moved)
        s["elapsed_since_start_s"] = float(cfg.wall_time_s)
    elif finals and os.path.exists(man):  # first start to last write, restarts included
        s["elapsed_since_start_s"] = round(
            max(os.path.getmtime(f) for f in finals) - os.path.getmtime(man), 1)
    s["hardware"] = cfg.hardware or hardware
    s["units_written"] = int(report.n_lines)
    if "units_configured" in manifest:  # progress against the work the manifest pins
        s["units_configured"] = int(manifest["units_configured"])
    else:  # a manifest of an older version: count the configured work now
        try:
            s["units_configured"] = len(load_questions(cfg)) * int(cfg.num_samples)
        except (OSError, ValueError) as e:
            logging.warning("could not count the configured units: %s", e)
    if manifest.get("resume_overrides"):
        s["resume_overrides"] = len(manifest["resume_overrides"])
    return s


def _finish(cfg, proc: int, manifest: dict, t0: float, hardware: str = "") -> dict:
    out_dir = cfg.out_dir
    _compact(out_dir, proc)
    wall = time.time() - t0
    recs, report = read_trace_jsonl(sorted(glob.glob(os.path.join(out_dir, "traces-p*.jsonl*"))))
    if proc != 0:
        return {"read_report": report.to_dict()}
    records = [r.to_dict(include_optional=True) for r in recs]
    s = summarize(records, wall, report)
    try:
        plot_summary(records, s, os.path.join(out_dir, "summary.png"))
    except Exception as e:  # plotting is a convenience; the numbers are in summary.json
        logging.warning("summary plot failed: %s", e)
    s.update(_run_facts(cfg, out_dir, hardware, report, manifest))
    atomic_write(os.path.join(out_dir, "summary.json"), lambda f: json.dump(s, f, indent=2))
    args = [a for a in sys.argv[1:] if not any(
        k in a for k in ("finalize_only", "config.hardware", "config.wall_time_s"))]
    s["read_report"] = report.to_dict()
    write_data_card(out_dir, "python -m regift_jax.generate_traces " + " ".join(args), s, manifest)
    print(json.dumps({k: v for k, v in s.items() if k != "read_report"}, indent=1))
    print(f"dropped on read: {report.summary()}")
    return s


def _fmt1(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _pct(d: dict) -> str:
    return "n/a" if d["yield"] is None else f"{100 * d['yield']:.1f}%"


def _source_line(manifest: dict) -> str:
    split = manifest.get("split", "pool")
    src = manifest.get("squad_source")
    where = (f"`{src}` (sha256 `{manifest['squad_sha256'].split(':')[-1][:16]}…`)" if src
             else "the dev file")
    return (f"- **Source questions**: SQuAD-v2 {'train' if split == 'train' else 'dev'}, "
            f"`{split}` split of {where} (article-hash split: `regift_jax/data/squad.py`)")


def _outcome_lines(summary: dict) -> List[str]:
    out = summary.get("outcomes")
    if not out:
        return []
    kept = ", ".join(f"{v['n']} `{k}` ({v['correct']} correct)" for k, v in out["kept"].items())
    lines = [f"Answers read: {kept} — `tag`: inside `<answer>`; `after_think`: no answer tag, "
             "the text after `</think>` (the authors' rule)."]
    if out["dropped"]:
        lines.append(f"Lines written but unusable (counted, not in the table): "
                     f"{sum(out['dropped'].values())} — " + ", ".join(
                         f"{k}: {v}" for k, v in sorted(out["dropped"].items(),
                                                        key=lambda kv: -kv[1])))
    return lines


def write_data_card(out_dir: str, command: str, summary: dict, manifest: dict) -> str:
    """``out_dir/README.md``: what the trace set is, how it was made, what it yields."""
    yl = summary["yield_lenient"]
    ys = summary["yield_strict_em"]
    rt = summary["reasoning_tokens"]
    lines = [
        "# ReGiFT teacher traces (SQuAD-v2) — data card", "",
        f"- **Teacher**: {manifest['teacher']}"
        + (f" (`{manifest['teacher_fingerprint']}`)" if manifest.get("teacher_fingerprint")
           else ""),
        f"- **Prompt**: `{manifest['prompt_version']}` (chat template: {manifest['chat']}; "
        f"prefill `{manifest['prefill'].strip()}`)",
        f"- **Decoding**: {json.dumps(manifest['decoding'])}, mode `{manifest['mode']}` "
        f"(reasoning budget {manifest['max_reasoning_tokens']} tokens, answer budget "
        f"{manifest['max_answer_tokens']}), {manifest['num_samples']} samples per question",
        _source_line(manifest),
        f"- **Command**: `{command}`",
        f"- **Hardware**: {summary.get('hardware') or 'not recorded'}",
        *([f"- **Progress**: {summary['units_written']} of {summary['units_configured']} "
           f"(question, sample) units written "
           f"({100 * summary['units_written'] / max(1, summary['units_configured']):.0f}%); "
           "the same command resumes the rest"]
          if summary.get("units_configured") else []),
        *([f"- **Resumed with overridden settings** {summary['resume_overrides']} time(s): "
           "see `resume_overrides` in `manifest.json`"] if summary.get("resume_overrides")
          else []),
        f"- **Wall time** (first start to last write, restarts included): "
        f"{summary.get('elapsed_since_start_s', summary['wall_time_s']):.0f} s", "",
        "| | records | correct (paper-lenient) | yield | correct (strict EM) |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in ("answerable", "unanswerable", "all"):
        lines.append(f"| {g} | {yl[g]['n']} | {yl[g]['correct']} | {_pct(yl[g])} | "
                     f"{ys[g]['correct']} ({_pct(ys[g])}) |")
    lines += [
        "", f"Questions with at least one correct trace: "
        f"{summary['questions_with_a_correct_trace']}.",
        f"Reasoning length (tokens): correct mean {_fmt1(rt['correct']['mean'])}, incorrect mean "
        f"{_fmt1(rt['incorrect']['mean'])} (plot: `summary.png`).",
        *_outcome_lines(summary), "",
        "Every record (correct and incorrect) is kept; the `regift_traces` TFDS builder's "
        "`correct` config selects the paper-lenient correct ones (the training default), "
        "`incorrect`/`all` serve the correctness ablation.", "",
        "## Licence", "",
        "Contexts, questions and gold answers come from SQuAD 2.0 (Rajpurkar, Jia, Liang, ACL "
        "2018), licensed CC BY-SA 4.0; this trace set is Adapted Material and is shared under "
        "the same licence, CC BY-SA 4.0 (see `data/squad_v2/`). The generated text was produced "
        f"by {manifest['teacher']} (see that model's licence).", ""]
    path = os.path.join(out_dir, "README.md")
    atomic_write_text(path, "\n".join(lines))
    return path
