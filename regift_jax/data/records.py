"""The ReGiFT trace record: schema, teacher-output parsing, JSONL/parquet/HF input and output.

One trace record is one teacher sample for one SQuAD-v2 question, stored as one JSON object per
line (JSONL).  Schema version 2 (:data:`SCHEMA_VERSION`): the 18 fields of version 1, all
required, plus the optional ``answer_source``; a version-1 shard (no ``answer_source``) reads
unchanged, its answer source taken from the parse.  Fields (order as written by
:func:`write_trace_jsonl`):

=================  ==========  ===================================================================
field              type        meaning
=================  ==========  ===================================================================
id                 str         SQuAD question id
context            str         the paragraph
question           str         the question
gold_answers       list[str]   gold answer texts (``[]`` only when ``is_impossible``)
is_impossible      bool        SQuAD-v2 unanswerable question
teacher            str         teacher model name
prompt_version     str         name/version of the extraction prompt (``regift_jax.core.prompts``)
decoding           dict        ``temperature`` (>=0), ``top_p`` (0,1], ``top_k`` (int >=0, 0 = off),
                               ``max_new_tokens`` (int >0), ``seed`` (int64)
sample_index       int         index of this sample among the N samples of one question (>=0)
raw_generation     str         the teacher text *including* the prefilled ``<think>`` if any and
                               the stop string ``</answer>``
reasoning          str         R = :func:`parse_output` (raw_generation).reasoning
answer             str         A = :func:`parse_output` (raw_generation).answer
exact_match        float       strict SQuAD EM in [0, 1]
f1                 float       SQuAD token F1 in [0, 1]
lenient_correct    bool        paper-lenient correctness
reasoning_tokens   int         tokens in R (teacher tokenizer, >=0)
prompt_tokens      int         tokens in the prompt (>=0)
generated_tokens   int         tokens generated (>=0)
answer_source      str         optional (v2): ``tag`` (inside ``<answer>``) or ``after_think``
                               (no answer tag: the text after ``</think>``, the authors' rule)
=================  ==========  ===================================================================

The TFDS, Hugging Face and parquet exports keep the 18 version-1 columns
(``TraceRecord.to_dict()``); ``to_dict(include_optional=True)`` adds ``answer_source``.

Reading policy (:func:`read_trace_jsonl`).  Every input line either becomes a record or is counted
under exactly one *drop reason*; so ``report.n_records + report.n_dropped == report.n_lines``.
Lines are the file's bytes split on ``b"\\n"`` (trailing ``\\r`` removed; the empty piece after a
final newline is not a line), as :func:`regift_jax.core.io.iter_raw_lines` reads them.  Drop
reasons, in the order they are checked:

* ``truncated_tail``: a ``.jsonl.gz`` whose compressed stream is cut short or corrupt; the lines
  before the cut are read, the unreadable rest counts as one line
* ``blank_line``, ``invalid_utf8``, ``malformed_json`` (includes duplicated JSON keys),
  ``not_an_object``
* ``missing_field`` / ``wrong_type`` / ``invalid_value`` (range, NaN, lone surrogates, answerable
  question without gold answers)
* a tag problem of ``raw_generation`` (:data:`FATAL_PROBLEMS`: ``unfinished <think>`` (the
  output ended inside its reasoning), ``missing </think>``, ``duplicated <answer>``, ``empty
  answer`` ...).  Unparseable teacher outputs are never training data; the paper's
  incorrect-only collapse came from exactly such outputs, so they are dropped from every
  selection and their rate is reported.
* ``fields_disagree``: ``reasoning``/``answer``/``answer_source`` differ from the parse of
  ``raw_generation``
* ``duplicate_record``: the same (id, teacher, prompt_version, sample_index) seen before

Records are kept but *warned about* (counted in ``report.warnings``) for: ``unknown_field`` (the
unknown keys go to ``TraceRecord.extra`` and are never written to TFDS/HF/parquet), and the
non-fatal tag problems in :data:`WARNING_PROBLEMS` (text outside the tags).  ``strict=True``
raises :class:`TraceFormatError` (a ``ValueError`` naming ``file:line`` and the reason) at the
first dropped line *or* warning.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

from regift_jax.core.io import (BLANK, INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, TRUNCATED_TAIL,
                                LineCounts, atomic_write, iter_raw_lines)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Problems reported by parse_output.  Fatal ones make a trace unusable.
FATAL_PROBLEMS = (
    "missing <think>",
    "unfinished <think>",
    "duplicated <think>",
    "missing </think>",
    "duplicated </think>",
    "missing <answer>",
    "duplicated <answer>",
    "missing </answer>",
    "duplicated </answer>",
    "tags out of order",
    "empty reasoning",
    "empty answer",
)
WARNING_PROBLEMS = (
    "text before <think>",
    "text between </think> and <answer>",
    "text after </answer>",
)

# Read-level drop reasons (in check order); tag problems and the two below follow them.
DROP_REASONS = (
    TRUNCATED_TAIL,
    BLANK,
    INVALID_UTF8,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    "missing_field",
    "wrong_type",
    "invalid_value",
) + FATAL_PROBLEMS + ("fields_disagree", "duplicate_record")
WARNING_REASONS = ("unknown_field",) + WARNING_PROBLEMS

DECODING_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
SCHEMA_VERSION = 2
OPTIONAL_FIELDS = ("answer_source",)  # added by schema version 2
ANSWER_SOURCES = ("tag", "after_think")
SELECTIONS = ("correct", "incorrect", "all")
CRITERIA = ("lenient", "strict_em")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1


class TraceFormatError(ValueError):
    """A trace line that cannot be used, raised by ``strict=True`` readers and by writers."""

    def __init__(self, path: str, line: int, reason: str, detail: str = ""):
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        msg = f"{path}:{line}: {reason}"
        super().__init__(msg + (f": {detail}" if detail else ""))


@dataclasses.dataclass
class TraceRecord:
    """One validated trace.  ``extra`` holds unknown JSON keys (kept, never exported)."""

    id: str
    context: str
    question: str
    gold_answers: list
    is_impossible: bool
    teacher: str
    prompt_version: str
    decoding: dict
    sample_index: int
    raw_generation: str
    reasoning: str
    answer: str
    exact_match: float
    f1: float
    lenient_correct: bool
    reasoning_tokens: int
    prompt_tokens: int
    generated_tokens: int
    answer_source: str = ""  # "" only for a record not yet parsed (see OPTIONAL_FIELDS)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple:
        """Identity of a sample: (id, teacher, prompt_version, sample_index)."""
        return (self.id, self.teacher, self.prompt_version, self.sample_index)

    def to_dict(self, include_extra: bool = False, include_optional: bool = False) -> dict:
        """The version-1 fields; ``include_optional``: and the set optional ones (what
        :func:`write_trace_jsonl` writes); ``include_extra``: and the unknown keys read."""
        out = {f: getattr(self, f) for f in SCHEMA_FIELDS}
        out["gold_answers"] = list(self.gold_answers)
        out["decoding"] = {k: self.decoding[k] for k in DECODING_FIELDS}
        if include_optional:
            out.update({f: getattr(self, f) for f in OPTIONAL_FIELDS if getattr(self, f)})
        if include_extra:
            for k, v in self.extra.items():
                out.setdefault(k, v)
        return out

    def is_correct(self, criterion: str = "lenient") -> bool:
        """``lenient``: the paper-lenient judgement; ``strict_em``: SQuAD exact match == 1."""
        if criterion == "lenient":
            return bool(self.lenient_correct)
        if criterion == "strict_em":
            return self.exact_match >= 1.0
        raise ValueError(f"unknown correctness criterion {criterion!r}; expected one of {CRITERIA}")


SCHEMA_FIELDS = tuple(f.name for f in dataclasses.fields(TraceRecord)
                      if f.name not in ("extra",) + OPTIONAL_FIELDS)


# ------------------------------------------------------------------------------------------------
# Teacher output parsing
# ------------------------------------------------------------------------------------------------


class ParsedOutput(NamedTuple):
    """What :func:`parse_output` reads from one teacher output."""
    reasoning: str
    answer: str
    problems: list
    answer_source: str  # "tag", "after_think", or "" when no answer could be read


def _tag_problems(counts: dict, prefilled_think: bool) -> list[str]:
    """Missing/duplicated tags; without any answer tag a closed ``<think>`` is complete (the
    answer follows it) and an unclosed one is ``unfinished <think>``."""
    problems: list[str] = []
    if counts[THINK_OPEN] == 0 and not prefilled_think:
        problems.append("missing <think>")
    answer_tags = counts[ANSWER_OPEN] + counts[ANSWER_CLOSE]
    if counts[THINK_CLOSE] == 0 and not answer_tags:
        problems.append("unfinished <think>")
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if counts[tag] > 1:
            problems.append(f"duplicated {tag}")
        elif counts[tag] == 0 and tag != THINK_OPEN and answer_tags:
            problems.append(f"missing {tag}")
    return problems


def _answer_span(text: str, p_tc: int, p_ao: int) -> tuple[str, str]:
    """``(answer, answer_source)``: inside ``<answer>`` (to ``</answer>`` or the end), else, when
    there is no answer tag at all, everything after the first ``</think>``."""
    if p_ao >= 0:
        a_start = p_ao + len(ANSWER_OPEN)
        p_ac = text.find(ANSWER_CLOSE, a_start)
        return text[a_start:p_ac if p_ac >= 0 else len(text)], "tag"
    if p_tc >= 0 and ANSWER_CLOSE not in text:
        return text[p_tc + len(THINK_CLOSE):], "after_think"
    return "", ""


def _text_warnings(text: str, p_to: int, p_tc: int, p_ao: int) -> list[str]:
    warnings = []
    if p_to > 0 and text[:p_to].strip():
        warnings.append("text before <think>")
    if p_tc >= 0 and p_ao > p_tc and text[p_tc + len(THINK_CLOSE):p_ao].strip():
        warnings.append("text between </think> and <answer>")
    p_ac = text.find(ANSWER_CLOSE, p_ao + len(ANSWER_OPEN)) if p_ao >= 0 else -1
    if p_ac >= 0 and text[p_ac + len(ANSWER_CLOSE):].strip():
        warnings.append("text after </answer>")
    return warnings


def parse_output(text: str, prefilled_think: bool = True) -> ParsedOutput:
    """Extract reasoning R, answer A and their problems from a teacher output.

    The format is ``<think>R</think><answer>A</answer>``, or, following the authors'
    ``extract_reasoning_and_answer`` (their teacher prompt never asks for answer tags, and
    R1-distilled models write the answer as plain text), ``<think>R</think>A`` with *no* answer
    tag: A is then the text after ``</think>`` (``answer_source="after_think"``; the authors
    also fell back to it for an empty ``<answer></answer>``, which stays ``empty answer`` here).

    ``prefilled_think``: the prompt ended with ``<think>``, so ``text`` may start directly with R
    (a leading ``<think>`` is also accepted).  R and A are stripped of surrounding whitespace.
    Extraction is best effort even when there are problems: R runs from after ``<think>`` (or the
    start) to the first ``</think>`` (else the first ``<answer>``, else the end).  An output with
    neither ``</think>`` nor an answer tag ends inside its reasoning (typically the token budget
    ran out): ``unfinished <think>``, its own drop reason.  ``problems`` lists strings from
    :data:`FATAL_PROBLEMS` and :data:`WARNING_PROBLEMS`, in that order of checks.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_output expects str, got {type(text).__name__}")
    counts = {t: text.count(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)}
    problems = _tag_problems(counts, prefilled_think)
    p_to, p_tc, p_ao = text.find(THINK_OPEN), text.find(THINK_CLOSE), text.find(ANSWER_OPEN)
    r_start = p_to + len(THINK_OPEN) if p_to >= 0 else 0
    r_end = p_tc if p_tc >= 0 else p_ao if p_ao >= 0 else len(text)
    reasoning = text[r_start:max(r_start, r_end)]
    answer, source = _answer_span(text, p_tc, p_ao)

    # Order: <think> < </think> <= <answer> < </answer>, among the tags that exist.
    positions = [(p, n) for p, n in ((p_to, 0), (p_tc, 1), (p_ao, 2), (text.find(ANSWER_CLOSE), 3))
                 if p >= 0]
    if [n for _, n in sorted(positions)] != sorted(n for _, n in positions):
        problems.append("tags out of order")
    if not reasoning.strip():
        problems.append("empty reasoning")
    if not answer.strip() and "unfinished <think>" not in problems:
        problems.append("empty answer")
    problems += _text_warnings(text, p_to, p_tc, p_ao)
    return ParsedOutput(reasoning.strip(), answer.strip(), problems,
                        source if answer.strip() else "")


def parse_teacher_output(text: str, prefilled_think: bool = True) -> tuple[str, str, list[str]]:
    """``(reasoning, answer, problems)`` of :func:`parse_output`."""
    parsed = parse_output(text, prefilled_think)
    return parsed.reasoning, parsed.answer, parsed.problems


def first_fatal_problem(problems: Sequence[str]) -> str | None:
    for p in problems:
        if p in FATAL_PROBLEMS:
            return p
    return None


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_text(name: str, v) -> str:
    if not isinstance(v, str):
        raise _Invalid("wrong_type", f"{name} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("invalid_value", f"{name} contains a lone surrogate (not valid Unicode)")
    return v


def _check_int(name: str, v, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise _Invalid("wrong_type", f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _Invalid("invalid_value", f"{name}={v} outside [{lo}, {hi}]")
    return v


def _check_float(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    if not _is_number(v):
        raise _Invalid("wrong_type", f"{name} must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        bracket = "(" if lo_open else "["
        raise _Invalid("invalid_value", f"{name}={v!r} outside {bracket}{lo}, {hi}]")
    return f


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise _Invalid("wrong_type", f"{name} must be true/false, got {type(v).__name__}")
    return v


def _validate_fields(obj: dict) -> tuple[TraceRecord, list[str]]:
    """Type/range-check one decoded JSON object.  Raises _Invalid; returns unknown-field names."""
    missing = [f for f in SCHEMA_FIELDS if f not in obj]
    if missing:
        raise _Invalid("missing_field", "missing " + ", ".join(missing))
    v: dict[str, Any] = {}
    for f in ("id", "context", "question", "teacher", "prompt_version", "raw_generation",
              "reasoning", "answer"):
        v[f] = _check_text(f, obj[f])
    golds = obj["gold_answers"]
    if not isinstance(golds, list):
        raise _Invalid("wrong_type", f"gold_answers must be a list, got {type(golds).__name__}")
    v["gold_answers"] = [_check_text(f"gold_answers[{i}]", g) for i, g in enumerate(golds)]
    v["is_impossible"] = _check_bool("is_impossible", obj["is_impossible"])
    v["lenient_correct"] = _check_bool("lenient_correct", obj["lenient_correct"])
    v["sample_index"] = _check_int("sample_index", obj["sample_index"], 0, _INT32_MAX)
    for f in ("reasoning_tokens", "prompt_tokens", "generated_tokens"):
        v[f] = _check_int(f, obj[f], 0, _INT32_MAX)
    v["exact_match"] = _check_float("exact_match", obj["exact_match"], 0.0, 1.0)
    v["f1"] = _check_float("f1", obj["f1"], 0.0, 1.0)

    dec = obj["decoding"]
    if not isinstance(dec, dict):
        raise _Invalid("wrong_type", f"decoding must be an object, got {type(dec).__name__}")
    dmissing = [k for k in DECODING_FIELDS if k not in dec]
    if dmissing:
        raise _Invalid("missing_field", "missing decoding." + ", decoding.".join(dmissing))
    v["decoding"] = {
        "temperature": _check_float("decoding.temperature", dec["temperature"], 0.0, 1e6),
        "top_p": _check_float("decoding.top_p", dec["top_p"], 0.0, 1.0, lo_open=True),
        "top_k": _check_int("decoding.top_k", dec["top_k"], 0, _INT32_MAX),
        "max_new_tokens": _check_int("decoding.max_new_tokens", dec["max_new_tokens"], 1,
                                     _INT32_MAX),
        "seed": _check_int("decoding.seed", dec["seed"], _INT64_MIN, _INT64_MAX),
    }
    if not v["is_impossible"] and not v["gold_answers"]:
        raise _Invalid("invalid_value", "answerable question (is_impossible=false) without "
                       "gold_answers")

    if "answer_source" in obj:
        v["answer_source"] = _check_text("answer_source", obj["answer_source"])
        if v["answer_source"] not in ANSWER_SOURCES:
            raise _Invalid("invalid_value", f"answer_source={v['answer_source']!r} not in "
                           f"{ANSWER_SOURCES}")
    known = SCHEMA_FIELDS + OPTIONAL_FIELDS
    unknown = [k for k in obj if k not in known]
    unknown += [f"decoding.{k}" for k in dec if k not in DECODING_FIELDS]
    extra = {k: obj[k] for k in obj if k not in known}
    for k in dec:
        if k not in DECODING_FIELDS:
            extra.setdefault("decoding_extra", {})[k] = dec[k]
    return TraceRecord(**v, extra=extra), unknown


def validate_record(obj: Any, prefilled_think: bool = True,
                    check_tags: bool = True) -> tuple[TraceRecord | None, str | None, str,
                                                      list[tuple[str, str]]]:
    """Validate one decoded JSON value.

    Returns ``(record, drop_reason, detail, warnings)``: ``record`` is ``None`` exactly when
    ``drop_reason`` is set; ``warnings`` is a list of ``(reason, detail)`` for a kept record.
    ``check_tags=False`` checks the schema only (used by writers, which must be able to save an
    unparseable teacher output so that it is counted when read back).
    """
    if not isinstance(obj, dict):
        return None, "not_an_object", f"top-level JSON value is {type(obj).__name__}", []
    try:
        rec, unknown = _validate_fields(obj)
    except _Invalid as e:
        return None, e.reason, e.detail, []
    warnings: list[tuple[str, str]] = []
    if unknown:
        warnings.append(("unknown_field", "unknown field(s) " + ", ".join(map(repr, unknown))))
    if check_tags:
        parsed = parse_output(rec.raw_generation, prefilled_think)
        fatal = first_fatal_problem(parsed.problems)
        if fatal is not None:
            return None, fatal, "raw_generation problems: " + "; ".join(parsed.problems), []
        which = [n for n, a, b in (("reasoning", parsed.reasoning, rec.reasoning.strip()),
                                   ("answer", parsed.answer, rec.answer.strip()),
                                   ("answer_source", parsed.answer_source,
                                    rec.answer_source or parsed.answer_source)) if a != b]
        if which:
            return None, "fields_disagree", (
                f"{', '.join(which)} differ(s) from parse_output(raw_generation)"), []
        rec.answer_source = parsed.answer_source  # a version-1 record: from the parse
        warnings += [(p, "raw_generation: " + p) for p in parsed.problems
                     if p in WARNING_PROBLEMS]
    return rec, None, "", warnings


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReadReport:
    """Accounting of one read: every line is a record or counted in ``dropped``."""

    files: list = dataclasses.field(default_factory=list)
    n_lines: int = 0
    n_records: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: dict = dataclasses.field(default_factory=dict)  # reason -> ["file:line: detail"]
    per_file: dict = dataclasses.field(default_factory=dict)  # path -> {"lines", "records"}
    max_samples: int = 5

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def _sample(self, reason: str, where: str, detail: str) -> None:
        lst = self.samples.setdefault(reason, [])
        if len(lst) < self.max_samples:
            lst.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "ReadReport") -> None:
        self.files += other.files
        self.n_lines += other.n_lines
        self.n_records += other.n_records
        self.dropped.update(other.dropped)
        self.warnings.update(other.warnings)
        for k, v in other.samples.items():
            lst = self.samples.setdefault(k, [])
            lst.extend(v[: max(0, self.max_samples - len(lst))])
        self.per_file.update(other.per_file)

    def to_dict(self) -> dict:
        return {
            "files": list(self.files),
            "n_lines": self.n_lines,
            "n_records": self.n_records,
            "n_dropped": self.n_dropped,
            "dropped": dict(sorted(self.dropped.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "samples": {k: list(v) for k, v in sorted(self.samples.items())},
            "per_file": dict(self.per_file),
        }

    def summary(self) -> str:
        lines = [f"read {len(self.files)} file(s): {self.n_lines} lines -> {self.n_records} "
                 f"records, {self.n_dropped} dropped"]
        for title, counter in (("dropped", self.dropped), ("warnings", self.warnings)):
            for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {title}: {reason}: {n}")
                for s in self.samples.get(reason, []):
                    lines.append(f"    e.g. {s}")
        return "\n".join(lines)

    def log(self, log: logging.Logger | None = None) -> None:
        log = log or logger
        level = logging.WARNING if (self.dropped or self.warnings) else logging.INFO
        log.log(level, "%s", self.summary())


def resolve_trace_paths(paths: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Expand files, directories (``*.jsonl`` and gzip ``*.jsonl.gz`` inside, sorted) and glob
    patterns, in order.

    Raises ``FileNotFoundError`` naming the entry when a path does not exist, a pattern matches
    nothing, or nothing at all is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(glob.escape(p), "*.jsonl")) +
                           glob.glob(os.path.join(glob.escape(p), "*.jsonl.gz")))
            if not found:
                raise FileNotFoundError(f"no *.jsonl or *.jsonl.gz trace shards in directory {p}")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        elif glob.has_magic(p):
            found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"trace pattern {p} matches no file")
            out += found
        else:
            raise FileNotFoundError(f"trace path {p} does not exist")
    if not out:
        raise FileNotFoundError("no trace files given")
    seen, unique = set(), []
    for f in out:
        a = os.path.abspath(f)
        if a not in seen:
            seen.add(a)
            unique.append(f)
    return unique


def _reject_duplicate_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicated JSON key {k!r}")
        obj[k] = v
    return obj


def _file_lines(path: str) -> Iterator[tuple[int, Optional[bytes], str]]:
    """``(line number, bytes, "")`` per line; a cut or corrupt gzip stream ends the file with one
    ``(line number, None, detail)`` for the unreadable rest."""
    counts = LineCounts(max_samples=1)
    lineno = 0
    for lineno, raw in iter_raw_lines(path, counts):
        yield lineno, raw, ""
    if counts.skipped:
        where = f"{path}:{lineno + 1}"
        sample = counts.samples[TRUNCATED_TAIL][0]
        yield lineno + 1, None, sample[len(where) + 2:] if sample.startswith(where) else sample


def _classify_line(raw: Optional[bytes], tail_detail: str, lineno: int, prefilled_think: bool,
                   seen: dict) -> tuple:
    """``(record, drop reason, detail, warnings)`` for one line (``raw=None``: a truncated tail)."""
    if raw is None:
        return None, TRUNCATED_TAIL, tail_detail, []
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark
    if not raw.strip():
        return None, BLANK, "empty line", []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, INVALID_UTF8, f"byte {e.start}: {e.reason}", []
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as e:
        return None, MALFORMED_JSON, str(e)[:200], []
    rec, reason, detail, warns = validate_record(obj, prefilled_think)
    if reason is None and rec.key in seen:
        return None, "duplicate_record", f"key {rec.key!r} first at {seen[rec.key]}", []
    return rec, reason, detail, warns


def read_trace_jsonl(paths: Union[PathLike, Sequence[PathLike]], strict: bool = False,
                     prefilled_think: bool = True,
                     max_samples: int = 5) -> tuple[list[TraceRecord], ReadReport]:
    """Read trace shards; returns ``(records, report)``.  See the module docstring for the policy.

    ``paths``: a file (``.jsonl`` or gzip ``.jsonl.gz``), a directory (its ``*.jsonl`` and
    ``*.jsonl.gz``), a glob, or a list of these.
    ``strict=True`` raises :class:`TraceFormatError` at the first dropped line or warning.
    """
    files = resolve_trace_paths(paths)
    report = ReadReport(max_samples=max_samples)
    records: list[TraceRecord] = []
    seen: dict[tuple, str] = {}
    for path in files:
        report.files.append(path)
        n_lines = n_rec = 0
        for lineno, raw, tail_detail in _file_lines(path):
            n_lines += 1
            where = f"{path}:{lineno}"
            rec, reason, detail, warns = _classify_line(raw, tail_detail, lineno,
                                                        prefilled_think, seen)
            for r, d in ([(reason, detail)] if reason is not None else warns):
                if strict:
                    raise TraceFormatError(path, lineno, r, d)
                (report.dropped if reason is not None else report.warnings)[r] += 1
                report._sample(r, where, d)
            if reason is None:
                seen[rec.key] = where
                records.append(rec)
                n_rec += 1
        report.per_file[path] = {"lines": n_lines, "records": n_rec}
        report.n_lines += n_lines
        report.n_records += n_rec
    assert report.n_records + report.n_dropped == report.n_lines
    return records, report


def select_records(records: Iterable[TraceRecord], selection: str = "all",
                   criterion: str = "lenient") -> list[TraceRecord]:
    """The ``correct`` / ``incorrect`` / ``all`` records under ``criterion``
    (``lenient`` | ``strict_em``), in input order."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown correctness criterion {criterion!r}; expected one of {CRITERIA}")
    if selection == "all":
        return list(records)
    want = selection == "correct"
    return [r for r in records if r.is_correct(criterion) == want]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _as_record(r: Union[TraceRecord, dict], i: int, where: str) -> TraceRecord:
    if isinstance(r, TraceRecord):
        r = r.to_dict(include_optional=True)
    rec, reason, detail, _ = validate_record(r, check_tags=False)
    if rec is None:
        raise TraceFormatError(where, i + 1, reason or "invalid", detail)
    if not rec.answer_source:  # a version-1 record: written as version 2
        rec.answer_source = parse_output(rec.raw_generation).answer_source
    return rec


def write_trace_jsonl(path: PathLike, records: Iterable[Union[TraceRecord, dict]],
                      include_extra: bool = False) -> int:
    """Atomically write records (``TraceRecord`` or dicts) as JSONL; returns the count.

    Every record is schema-checked first (:class:`TraceFormatError` names the record's 1-based
    position, as ``<path>:<n>``); tag problems are *not* errors here, so unparseable teacher
    outputs can be saved and are counted when read.  Written as schema version 2: a record
    without ``answer_source`` gets the one its ``raw_generation`` parses to.  The file appears
    complete or not at all (temp file in the same directory, fsync, ``os.replace``).
    """
    path = os.fspath(path)
    recs = [_as_record(r, i, path) for i, r in enumerate(records)]

    def write(f):
        for r in recs:
            f.write(json.dumps(r.to_dict(include_extra=include_extra, include_optional=True),
                               ensure_ascii=False, allow_nan=False))
            f.write("\n")

    atomic_write(path, write)
    return len(recs)


# ------------------------------------------------------------------------------------------------
# Parquet / Hugging Face datasets
# ------------------------------------------------------------------------------------------------


def arrow_schema():
    """The pyarrow schema of exported traces (field order = :data:`SCHEMA_FIELDS`)."""
    import pyarrow as pa  # lazy: export only; the reader and writer run without it

    return pa.schema([
        ("id", pa.string()), ("context", pa.string()), ("question", pa.string()),
        ("gold_answers", pa.list_(pa.string())), ("is_impossible", pa.bool_()),
        ("teacher", pa.string()), ("prompt_version", pa.string()),
        ("decoding", pa.struct([("temperature", pa.float64()), ("top_p", pa.float64()),
                                ("top_k", pa.int32()), ("max_new_tokens", pa.int32()),
                                ("seed", pa.int64())])),
        ("sample_index", pa.int32()), ("raw_generation", pa.string()),
        ("reasoning", pa.string()), ("answer", pa.string()), ("exact_match", pa.float64()),
        ("f1", pa.float64()), ("lenient_correct", pa.bool_()), ("reasoning_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()), ("generated_tokens", pa.int32()),
    ])


def records_to_arrow(records: Iterable[TraceRecord]):
    """A ``pyarrow.Table`` with :func:`arrow_schema` (``extra`` is not exported)."""
    import pyarrow as pa  # lazy: export only; the reader and writer run without it

    rows = [r.to_dict() for r in records]
    schema = arrow_schema()
    return pa.Table.from_pylist(rows, schema=schema)


def _load_selected(source, selection, criterion, strict, prefilled_think):
    if isinstance(source, (str, os.PathLike)):
        records, report = read_trace_jsonl(source, strict=strict, prefilled_think=prefilled_think)
    else:
        source = list(source)
        if source and all(isinstance(r, TraceRecord) for r in source):
            records, report = source, None
        else:
            records, report = read_trace_jsonl(source, strict=strict,
                                               prefilled_think=prefilled_think)
    if report is not None:
        report.log()
    return select_records(records, selection, criterion), report


def traces_to_hf_dataset(paths, selection: str = "all", criterion: str = "lenient",
                         strict: bool = False, prefilled_think: bool = True,
                         return_report: bool = False):
    """Load trace shards (paths as :func:`read_trace_jsonl`, or a list of ``TraceRecord``) as a
    Hugging Face ``datasets.Dataset`` with the schema's columns; ``decoding`` is a struct.

    With ``return_report=True`` returns ``(dataset, report)`` (``report`` is ``None`` for records).
    """
    import datasets  # lazy: pulls in pandas/fsspec/huggingface_hub, needed by this export only

    records, report = _load_selected(paths, selection, criterion, strict, prefilled_think)
    table = records_to_arrow(records)
    ds = datasets.Dataset(table)
    return (ds, report) if return_report else ds


def write_traces_parquet(paths, out_path: PathLike, selection: str = "all",
                         criterion: str = "lenient", strict: bool = False,
                         prefilled_think: bool = True) -> int:
    """Atomically write the (selected) traces to one parquet file; returns the row count.

    ``paths`` as :func:`traces_to_hf_dataset`.  Read back with ``pyarrow.parquet.read_table`` or
    ``datasets.Dataset.from_parquet``.
    """
    import pyarrow.parquet as pq  # lazy: export only; the reader and writer run without it

    records, _ = _load_selected(paths, selection, criterion, strict, prefilled_think)
    table = records_to_arrow(records)
    atomic_write(out_path, lambda f: pq.write_table(table, f), mode="wb")
    return table.num_rows
