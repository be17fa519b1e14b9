"""regift_jax.core.io: atomic writes, the one JSONL reader and its counting, strict counts."""

import gzip
import json
import os

import pytest

from regift_jax.core import io


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    io.atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"

    def boom(f):
        f.write("partial")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        io.atomic_write(path, boom)
    assert path.read_text() == "two\n"  # the previous file, never a torn one
    assert os.listdir(path.parent) == ["a.json"]


def _read(path):
    counts = io.LineCounts()
    return [(n, o) for n, o in io.iter_jsonl(path, counts)], counts


def test_every_skipped_line_is_counted_with_its_location(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n[1]\n{"b": \n\xff\n' + b"[" * 50000 + b"\n"
                     + b'{"n": ' + b"9" * 5000 + b'}\n{"c": 3}')
    got, counts = _read(path)
    assert got == [(1, {"a": 1}), (8, {"c": 3})]
    assert counts.n_lines == 8 and counts.n_skipped == 6
    assert dict(counts.skipped) == {io.BLANK: 1, io.NOT_AN_OBJECT: 1, io.MALFORMED_JSON: 3,
                                    io.INVALID_UTF8: 1}
    assert counts.samples[io.INVALID_UTF8][0].startswith(f"{path}:5: ")
    # deeply nested JSON is a malformed line, not a RecursionError
    assert any(s.startswith(f"{path}:6: ") for s in counts.samples[io.MALFORMED_JSON])
    assert "skipped" in counts.summary() and counts.to_dict()["n_lines"] == 8


def test_gzip_cut_short_corrupt_or_empty_is_a_counted_tail(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(50)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:len(data) // 2])
    got, counts = _read(cut)
    assert [o["i"] for _, o in got] == list(range(len(got))) and len(got) < 50
    assert counts.skipped == {io.TRUNCATED_TAIL: 1}
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(b"")
    got, counts = _read(empty)
    assert got == [] and counts.skipped == {io.TRUNCATED_TAIL: 1}
    assert "no gzip header" in counts.samples[io.TRUNCATED_TAIL][0]
    with pytest.raises(FileNotFoundError):
        _read(tmp_path / "missing.jsonl")


class Bad(ValueError):
    pass


def test_strict_counts_raise_the_callers_error_naming_the_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b"\n')
    with pytest.raises(Bad, match=r"s\.jsonl:3: invalid JSON \("):
        list(io.iter_jsonl(path, io.StrictLineCounts(Bad)))
    path.write_bytes(b'{"a": 1}\n[2]\n')
    tolerant = io.StrictLineCounts(Bad, tolerate=(io.BLANK, io.NOT_AN_OBJECT))
    assert [o for _, o in io.iter_jsonl(path, tolerant)] == [{"a": 1}]
    assert tolerant.skipped == {io.NOT_AN_OBJECT: 1}
