"""File I/O every stage shares: atomic writes and the one JSONL / JSONL.gz line reader.

``atomic_write`` writes to a temporary file in the target's directory, fsyncs and renames, so a
reader sees the whole file or the previous one, never a torn write (a SIGKILL mid-save included).

``iter_jsonl`` is the only place that decodes JSON lines from disk.  Bad input never escapes as a
bare decoder error: a line that is not valid UTF-8, not JSON, or not a JSON object is counted in
a :class:`LineCounts` under its reason with ``file:line`` samples and skipped; a gzip file cut
short (or with a corrupt stream) ends the file there and is counted as ``truncated_tail``.  The
caller decides what a skipped line means (a trace reader drops it, a resumable job regenerates
the unit) and reports the counts; :class:`StrictLineCounts` makes a skipped line an error of the
caller's type (a BBQ or StereoSet file, where a bad line is never dropped) naming ``file:line``.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import tempfile
import zlib
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Type, Union

PathLike = Union[str, os.PathLike]

# Reasons a line is skipped by iter_jsonl.
BLANK, INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, TRUNCATED_TAIL = (
    "blank_line", "invalid_utf8", "malformed_json", "not_an_object", "truncated_tail")


def atomic_write(path: PathLike, write_fn: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write_fn(f)`` on a temporary file beside ``path``, fsync, then rename onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 1) -> None:
    atomic_write(path, lambda f: (json.dump(obj, f, indent=indent, default=str), f.write("\n")))


def open_maybe_gzip(path: PathLike, mode: str = "rb"):
    """``open`` that transparently gunzips ``*.gz``."""
    path = os.fspath(path)
    return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


@dataclasses.dataclass
class LineCounts:
    """Lines read and skipped (by reason, with up to ``max_samples`` ``file:line`` examples)."""
    max_samples: int = 5
    n_lines: int = 0
    skipped: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    samples: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        s = self.samples.setdefault(reason, [])
        if len(s) < self.max_samples:
            s.append(f"{where}: {detail}" if detail else where)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.n_skipped:
            return f"{self.n_lines} lines, none skipped"
        parts = [f"{self.n_lines} lines, {self.n_skipped} skipped:"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            parts.append(f"  {reason}: {n} (e.g. {'; '.join(self.samples.get(reason, []))})")
        return "\n".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {"n_lines": self.n_lines, "skipped": dict(self.skipped),
                "samples": {k: list(v) for k, v in self.samples.items()}}


#: How a line that :func:`iter_jsonl` skips is named in an error message.
LINE_PROBLEMS = {INVALID_UTF8: "invalid UTF-8", MALFORMED_JSON: "invalid JSON",
                 NOT_AN_OBJECT: "not a JSON object", TRUNCATED_TAIL: "file ends early"}


class StrictLineCounts(LineCounts):
    """:class:`LineCounts` for files where a bad line is an error: the first skipped line whose
    reason is not in ``tolerate`` raises ``error(f"file:line: <problem> (<detail>)")``."""

    def __init__(self, error: Type[Exception] = ValueError, tolerate: Sequence[str] = (BLANK,)):
        super().__init__()
        self.error, self.tolerate = error, tuple(tolerate)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        if reason not in self.tolerate:
            problem = LINE_PROBLEMS.get(reason, reason)
            raise self.error(f"{where}: {problem} ({detail})" if detail else f"{where}: {problem}")
        super().skip(reason, where, detail)


def iter_raw_lines(path: PathLike, counts: LineCounts) -> Iterator[Tuple[int, bytes]]:
    """``(line number, bytes without the line break)``; a cut or corrupt gzip stream (an empty
    ``.gz`` included) ends the file and is counted as ``truncated_tail`` (the lines before it are
    kept)."""
    path = os.fspath(path)
    lineno = 0
    if path.endswith(".gz") and os.path.getsize(path) == 0:
        # gzip reads an empty file as an empty stream, but a .gz always has a header: the file
        # was created and never written (a writer killed before its first flush).
        counts.skip(TRUNCATED_TAIL, f"{path}:1", "empty file (no gzip header)")
        return
    try:
        with open_maybe_gzip(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw.rstrip(b"\n").rstrip(b"\r")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        counts.skip(TRUNCATED_TAIL, f"{path}:{lineno + 1}", f"compressed stream ends early ({e})")


def iter_jsonl(path: PathLike, counts: LineCounts) -> Iterator[Tuple[int, dict]]:
    """``(line number, object)`` for every JSON-object line of a ``.jsonl`` / ``.jsonl.gz`` file.

    Blank lines, non-UTF-8 bytes, malformed JSON, non-object values and a truncated gzip tail are
    counted in ``counts`` (with ``file:line``) and skipped.  A missing file raises
    ``FileNotFoundError`` (the caller names what it was looking for).
    """
    path = os.fspath(path)
    for lineno, raw in iter_raw_lines(path, counts):
        counts.n_lines += 1
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark
        if not raw.strip():
            counts.skip(BLANK, where)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            counts.skip(INVALID_UTF8, where, str(e))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, json's own limits (huge
            counts.skip(MALFORMED_JSON, where, str(e))  # integers) and too deep nesting
            continue
        if not isinstance(obj, dict):
            counts.skip(NOT_AN_OBJECT, where, f"a JSON {type(obj).__name__}, not an object")
            continue
        yield lineno, obj
