"""Property-based tests of every JSONL-family reader against random corruptions.

Each reader gets a small file of good records, corrupted in one way: truncated at any byte, one
byte replaced by any value, one line replaced by a wrong JSON type / a wrong field type / a huge
number / non-UTF-8 bytes / deeply nested JSON, or (for the readers that take ``.jsonl.gz``) the
gzip stream truncated or one of its bytes replaced.  The properties:

* no exception other than the project's own error types (and, from strict readers, one that
  names the file);
* every bad record is counted (lenient readers: each line is either returned or counted;
  strict readers: a bad record is an error, never dropped or skipped silently);
* every good record is kept: a line the corruption did not touch comes back unchanged.

Examples are bounded and derandomized (the same examples on every run).
"""

import atexit
import copy
import dataclasses
import gzip
import json
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regift_jax.core import io
from regift_jax.data import records as trace_records
from regift_jax.data.bbq import BBQFormatError, parse_item, read_bbq_file
from regift_jax.eval.config import InputError
from regift_jax.eval.generations import InputCounts, read_generations
from regift_jax.eval.stereoset import StereoSetFormatError, load_stereoset
from _data import REPO, bbq_dir

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TMP = tempfile.mkdtemp(prefix="regift_readers_")
atexit.register(shutil.rmtree, TMP, ignore_errors=True)

# Whole-line payloads that are never a good record of any reader.
BAD_LINES = [b"[1, 2]", b'"a string"', b"3", b"null", b"true", b'{"broken": ', b"{",
             b'{"x": 1e999999}', b"1" * 5000, b'{"n": ' + b"9" * 5000 + b"}",
             b"\xff\xfe{}", b'{"t": "\xc3\x28"}', b"[" * 20000, b"\x00\x01\x02"]


# ------------------------------------------------------------------------------ corruptions

def _spans(data: bytes):
    """``(start, end)`` byte spans of the lines (end excludes the line break)."""
    out, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        out.append((start, end))
        start = end + 1
    return out


def n_lines(data: bytes) -> int:
    return len(_spans(data))


@st.composite
def corrupted(draw, lines, bad_lines=BAD_LINES):
    """``(data, intact)``: the file of ``lines`` corrupted once, and the indices of the original
    lines that survive as whole lines, unchanged."""
    data = b"".join(x + b"\n" for x in lines)
    spans = _spans(data)
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "insert"]))
    if kind == "truncate":
        k = draw(st.integers(0, len(data)))
        return data[:k], [i for i, (s, e) in enumerate(spans) if e <= k]
    if kind == "flip":
        k = draw(st.integers(0, len(data) - 1))
        v = draw(st.integers(0, 255).filter(lambda b: b != data[k]))
        out = data[:k] + bytes([v]) + data[k + 1:]
        # a line is touched by its own bytes, its line break and the break before it
        return out, [i for i, (s, e) in enumerate(spans) if k < s - 1 or k > e]
    j = draw(st.integers(0, len(lines) - 1))
    bad = draw(st.sampled_from(bad_lines))
    if kind == "replace":
        new = lines[:j] + [bad] + lines[j + 1:]
        return b"".join(x + b"\n" for x in new), [i for i in range(len(lines)) if i != j]
    new = lines[:j] + [bad] + lines[j:]
    return b"".join(x + b"\n" for x in new), list(range(len(lines)))


@st.composite
def corrupted_gzip(draw, lines):
    """``(data, intact)`` of a ``.jsonl.gz``: the compressed stream truncated or one of its
    bytes replaced; ``intact`` is None (what survives depends on the stream)."""
    data = gzip.compress(b"".join(x + b"\n" for x in lines), mtime=0)
    if draw(st.booleans()):
        return data[:draw(st.integers(0, len(data)))], None
    k = draw(st.integers(0, len(data) - 1))
    v = draw(st.integers(0, 255).filter(lambda b: b != data[k]))
    return data[:k] + bytes([v]) + data[k + 1:], None


def _write(name: str, data: bytes) -> str:
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _in_order(sub, seq) -> bool:
    """``sub`` is a subsequence of ``seq``."""
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


# ------------------------------------------------------------------------------ core.io

GOOD = [{"id": i, "text": f"row {i} — ünïcödé", "xs": [i, i + 0.5]} for i in range(5)]
GOOD_LINES = [_dumps(o) for o in GOOD]


def _read_jsonl(path):
    counts = io.LineCounts()
    got = [obj for _, obj in io.iter_jsonl(path, counts)]
    return got, counts


@SETTINGS
@given(corrupted(GOOD_LINES))
def test_iter_jsonl_counts_every_bad_line_and_keeps_every_good_one(case):
    data, intact = case
    got, counts = _read_jsonl(_write("x.jsonl", data))
    assert all(isinstance(o, dict) for o in got)
    assert counts.n_lines == n_lines(data)
    assert len(got) + counts.n_skipped == counts.n_lines
    assert _in_order([GOOD[i] for i in intact], got)


@SETTINGS
@given(corrupted_gzip(GOOD_LINES))
def test_iter_jsonl_gzip_damage_is_a_counted_tail(case):
    data, _ = case
    got, counts = _read_jsonl(_write("x.jsonl.gz", data))
    assert len(got) + counts.n_skipped - counts.skipped.get(io.TRUNCATED_TAIL, 0) \
        == counts.n_lines
    assert counts.skipped.get(io.TRUNCATED_TAIL, 0) <= 1
    if got != GOOD:  # anything lost or altered is counted
        assert counts.n_skipped > 0


# ------------------------------------------------------------------------------ BBQ

def _bbq_rows():
    with open(os.path.join(bbq_dir(), "Religion.jsonl"), encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(4)]


BBQ_WRONG = {  # field -> values that are never valid
    "example_id": ["7", 1.0, -1, 2 ** 40, True, None, 1e999],
    "label": [3, -1, "1", 1.0, True, None],
    "context_condition": ["AMBIG", 1, None], "question_polarity": ["negative", [], None],
    "category": ["Astrology", 5], "context": [1, None, ["x"]], "question": [{}, 2],
    "ans0": ["", "  ", 0], "answer_info": [[], "x", {"ans0": ["a"]}],
    "additional_metadata": [[], "x", {"subcategory": "None"}],
}


def _bbq_bad_lines():
    rows = _bbq_rows() if os.path.isdir(os.path.join(REPO, "data", "bbq")) else []
    out = list(BAD_LINES)
    for field, values in BBQ_WRONG.items():
        for v in values:
            for r in rows[:1]:  # a fresh example_id: the line is bad for its field alone
                bad = dict(copy.deepcopy(r), example_id=999)
                bad[field] = v
                out.append(_dumps(bad))
        if rows:
            out.append(_dumps({k: v for k, v in dict(rows[0], example_id=999).items()
                               if k != field}))
    return out


def _strict_case(read, error, rows, parse, data, intact, name):
    """A strict reader: an error of its own type naming the file, or every non-blank line
    returned, the untouched ones unchanged."""
    path = _write(name, data)
    try:
        got = read(path)
    except error as e:
        assert path in str(e)
        return
    non_blank = sum(bool(data[s:e].strip()) for s, e in _spans(data))
    assert len(got) == non_blank
    assert _in_order([parse(rows[i]) for i in intact], [parse(g) for g in got])


@pytest.fixture(scope="module")
def bbq_rows():
    bbq_dir()  # skips without the BBQ files
    return _bbq_rows()


@SETTINGS
@given(data=st.data())
def test_bbq_reader_never_drops_a_bad_row(bbq_rows, data):
    lines = [_dumps(r) for r in bbq_rows]
    raw, intact = data.draw(corrupted(lines, _bbq_bad_lines()))

    def same(x):  # an item without the file:line it came from (lines move when split)
        item = x if not isinstance(x, dict) else parse_item(x, "orig")
        return dataclasses.replace(item, source="")
    _strict_case(read_bbq_file, BBQFormatError, bbq_rows, same, raw, intact, "Religion.jsonl")


def test_bbq_reader_rejects_every_wrong_type(bbq_rows, tmp_path):
    good = [_dumps(r) for r in bbq_rows]
    for bad in _bbq_bad_lines():
        path = tmp_path / "Religion.jsonl"
        path.write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
        with pytest.raises(BBQFormatError, match=r"Religion\.jsonl:3: "):
            read_bbq_file(str(path))


# ------------------------------------------------------------------------------ StereoSet

SS_ROWS = [{"type": "intrasentence" if i % 2 else "intersentence", "target": f"t{i}",
            "bias_type": "race", "context": f"Context {i} BLANK.", "stereotype": f"s{i}",
            "anti-stereotype": f"a{i}", "unrelated": f"u{i}"} for i in range(4)]
SS_BAD = BAD_LINES + [_dumps(dict(SS_ROWS[0], **{k: v})) for k, v in
                      (("type", "other"), ("target", 3), ("stereotype", ""), ("unrelated", None),
                       ("context", ["x"]))]


@SETTINGS
@given(corrupted([_dumps(r) for r in SS_ROWS], SS_BAD))
def test_stereoset_reader_never_drops_a_bad_row(case):
    raw, intact = case

    def same(x):
        return x if isinstance(x, dict) else {
            "type": x.split, "target": x.target, "bias_type": x.bias_type, "context": x.context,
            "stereotype": x.stereotype, "anti-stereotype": x.anti_stereotype,
            "unrelated": x.unrelated}
    try:
        _strict_case(load_stereoset, StereoSetFormatError, SS_ROWS, same, raw, intact,
                     "ss.jsonl")
    except StereoSetFormatError as e:  # an empty file (cut at byte 0) names the file too
        assert "ss.jsonl" in str(e)


# ------------------------------------------------------------------------------ generations

GEN_ROWS = [{"example_id": i, "generation": f"</think> <answer>{i}</answer>"} for i in range(4)]
GEN_WRONG = [_dumps(dict(GEN_ROWS[0], example_id=v)) for v in
             ("abc", None, [1], {"a": 1}, 1e999, -1e999, 1.5, True)] + \
    [_dumps({"example_id": 0, "generation": v}) for v in (1, [], {}, True)] + \
    [_dumps({"generation": "no id"}), _dumps({"example_id": 1})]


def _gen_row(r):
    return (r["example_id"], r["generation"]) if isinstance(r, dict) else (r.example_id, r.text)


def _check_generations(path, data, intact):
    counts = InputCounts()
    try:
        rows = read_generations(path, counts)
    except InputError as e:
        assert path in str(e)
        return None
    assert len(rows) + len(counts.malformed_rows) == counts.n_rows
    if intact is not None:
        assert _in_order([_gen_row(GEN_ROWS[i]) for i in intact], [_gen_row(r) for r in rows])
    return rows, counts


@SETTINGS
@given(corrupted([_dumps(r) for r in GEN_ROWS], BAD_LINES + GEN_WRONG))
def test_generations_jsonl_reader(case):
    data, intact = case
    path = _write("g.jsonl", data)
    out = _check_generations(path, data, intact)
    if out is not None and not data.lstrip().startswith(b"["):
        rows, counts = out
        non_blank = sum(bool(data[s:e].strip()) for s, e in _spans(data))
        assert counts.n_rows == non_blank  # every line a row (good or malformed) or an error


@SETTINGS
@given(corrupted([_dumps(GEN_ROWS)], [_dumps(GEN_ROWS[:2] + [json.loads(b)])
                                      for b in GEN_WRONG] + BAD_LINES))
def test_generations_json_list_reader(case):
    data, _ = case
    out = _check_generations(_write("g.json", data), data, None)
    if out is not None and data == _dumps(GEN_ROWS) + b"\n":
        assert [_gen_row(r) for r in out[0]] == [_gen_row(r) for r in GEN_ROWS]


def test_generations_wrong_types_are_malformed_rows(tmp_path):
    for bad in GEN_WRONG:
        path = tmp_path / "g.jsonl"
        path.write_bytes(_dumps(GEN_ROWS[1]) + b"\n" + bad + b"\n")
        counts = InputCounts()
        rows = read_generations(str(path), counts)
        assert [_gen_row(r) for r in rows] == [_gen_row(GEN_ROWS[1])], bad
        assert len(counts.malformed_rows) == 1 and counts.malformed_rows[0].startswith(
            f"{path}:2: "), bad


# ------------------------------------------------------------------------------ traces

def _trace_lines():
    path = os.path.join(REPO, "tests", "fixtures", "train", "traces", "synthetic-00000.jsonl")
    with open(path, "rb") as f:
        return [next(f).rstrip(b"\n") for _ in range(4)]


TRACE_LINES = _trace_lines()
TRACE_WRONG = [_dumps(dict(json.loads(TRACE_LINES[0]), **{k: v})) for k, v in
               (("sample_index", "0"), ("gold_answers", "x"), ("is_impossible", 1),
                ("f1", 2.5), ("decoding", []), ("prompt_tokens", 1e999), ("id", None))]


def _trace_ids(recs):
    return [(r.id, r.sample_index, r.raw_generation) for r in recs]


def _read_traces(path):
    recs, report = trace_records.read_trace_jsonl(path)
    assert report.n_records + report.n_dropped == report.n_lines
    return recs, report


ORIGINAL_TRACES = _trace_ids(trace_records.read_trace_jsonl(
    _write("orig.jsonl", b"\n".join(TRACE_LINES) + b"\n"))[0])


@SETTINGS
@given(corrupted(TRACE_LINES, BAD_LINES + TRACE_WRONG))
def test_trace_reader_counts_every_dropped_line(case):
    data, intact = case
    recs, report = _read_traces(_write("t.jsonl", data))
    assert report.n_lines == n_lines(data)
    assert _in_order([ORIGINAL_TRACES[i] for i in intact], _trace_ids(recs))


@SETTINGS
@given(corrupted_gzip(TRACE_LINES))
def test_trace_reader_gzip_damage(case):
    data, _ = case
    recs, report = _read_traces(_write("t.jsonl.gz", data))
    if _trace_ids(recs) != ORIGINAL_TRACES:
        assert report.n_dropped > 0
