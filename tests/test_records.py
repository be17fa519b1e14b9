"""Trace record schema: teacher-output parsing, JSONL reading/accounting, writing, export."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regift_jax.data import records as R

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "traces")
SHARD0 = os.path.join(FIXTURE, "shard-00000.jsonl")
SHARD1 = os.path.join(FIXTURE, "shard-00001.jsonl")


def make_record(i=0, **over):
    reasoning, answer = f"Step {i}: the context names Paris.", "Paris"
    rec = {
        "id": f"q{i}", "context": "Paris is the capital of France.",
        "question": "What is the capital of France?", "gold_answers": ["Paris"],
        "is_impossible": False, "teacher": "t", "prompt_version": "extract_v1",
        "decoding": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 512,
                     "seed": 0},
        "sample_index": 0,
        "raw_generation": f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>",
        "reasoning": reasoning, "answer": answer, "exact_match": 1.0, "f1": 1.0,
        "lenient_correct": True, "reasoning_tokens": 7, "prompt_tokens": 30,
        "generated_tokens": 15,
    }
    rec.update(over)
    return rec


# ---------------------------------------------------------------- parse_teacher_output


def test_parse_well_formed_with_and_without_prefilled_think():
    assert R.parse_teacher_output("<think> R1 </think>\n<answer> A1 </answer>") == ("R1", "A1", [])
    # prefilled: the generated text starts inside the think block
    assert R.parse_teacher_output("R2\n</think><answer>A2</answer>") == ("R2", "A2", [])
    r, a, p = R.parse_teacher_output("R2\n</think><answer>A2</answer>", prefilled_think=False)
    assert (r, a) == ("R2", "A2") and p == ["missing <think>"]


@pytest.mark.parametrize("text,problem,reasoning,answer", [
    ("<think>R<answer>A</answer>", "missing </think>", "R", "A"),
    ("<think>R</think>A</answer>", "missing <answer>", "R", ""),
    ("<think>R", "unfinished <think>", "R", ""),
    ("R without a close", "unfinished <think>", "R without a close", ""),
    ("<think>R</think>\n  ", "empty answer", "R", ""),
    ("<think>R</think><answer>A", "missing </answer>", "R", "A"),
    ("<think>R</think><answer>A</answer><answer>B</answer>", "duplicated <answer>", "R", "A"),
    ("<think>R</think></think><answer>A</answer>", "duplicated </think>", "R", "A"),
    ("<think><think>R</think><answer>A</answer>", "duplicated <think>", "<think>R", "A"),
    ("<think>R</think><answer>  </answer>", "empty answer", "R", ""),
    ("<think> </think><answer>A</answer>", "empty reasoning", "", "A"),
    ("<answer>A</answer><think>R</think>", "tags out of order", "R", "A"),
])
def test_parse_problems(text, problem, reasoning, answer):
    r, a, problems = R.parse_teacher_output(text)
    assert problem in problems and problem in R.FATAL_PROBLEMS
    assert (r, a) == (reasoning, answer)


def test_parse_warnings_are_not_fatal():
    r, a, p = R.parse_teacher_output("<think>R</think> so: <answer>A</answer> bye")
    assert (r, a) == ("R", "A")
    assert p == ["text between </think> and <answer>", "text after </answer>"]
    assert R.first_fatal_problem(p) is None
    _, _, p = R.parse_teacher_output("Sure! <think>R</think><answer>A</answer>")
    assert p == ["text before <think>"]


# ---------------------------------------------------------------- R1-shaped outputs (no tags)

R1_FIXTURE = os.path.join(HERE, "fixtures", "r1", "outputs.jsonl")


def test_untagged_answer_is_the_text_after_think():
    """The authors' rule: without an ``<answer>`` tag the answer is the text after ``</think>``."""
    p = R.parse_output("R. Wait, no: R2.\n</think>\n\nThe answer is **Lyon**.\n")
    assert p == ("R. Wait, no: R2.", "The answer is **Lyon**.", [], "after_think")
    p = R.parse_output("<think>R</think>\n<answer> A </answer>")
    assert p == ("R", "A", [], "tag")
    assert R.parse_teacher_output("<think>R</think> A") == ("R", "A", [])
    # an answer tag anywhere means the tagged format: no fallback to the text after </think>
    assert R.parse_output("<think>R</think>A<answer></answer>").problems[0] == "empty answer"


def test_r1_fixture_outputs_parse_and_judge_as_documented():
    from regift_jax.core import prompts
    from regift_jax.traces.judge import judge
    tmpl = prompts.get_template("teacher_extraction")
    squad = json.load(open(os.path.join(HERE, "fixtures", "squad_train", "train-v2.0.json")))
    golds = {q["id"]: [a["text"] for a in q["answers"]]
             for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]}
    outcomes = []
    with open(R1_FIXTURE, encoding="utf-8") as f:
        outputs = [json.loads(line) for line in f]
    for o in outputs:
        p = R.parse_output(prompts.restore_prefill(tmpl, o["text"]))
        want = o["expect"]
        assert p.answer_source == want["answer_source"], o["id"]
        assert R.first_fatal_problem(p.problems) == want.get("dropped"), o["id"]
        assert judge(p.answer, golds[o["id"]]).lenient_correct is want["lenient_correct"], o["id"]
        assert p.reasoning.startswith("Let's think step by step")
        outcomes.append(want.get("dropped") or p.answer_source)
    assert {k: outcomes.count(k) for k in set(outcomes)} == {
        "after_think": 8, "tag": 3, "unfinished <think>": 2}
    assert any("Wait," in o["text"] for o in outputs if o["expect"]["answer_source"])
    assert all(o["finish_reason"] == "length" for o in outputs if o["expect"].get("dropped"))


def test_answer_source_field_is_optional_checked_and_written(tmp_path):
    """Schema v2: ``answer_source`` is optional (v1 records read as before, the source taken from
    the parse), must agree with the parse when present, and is written by the writer."""
    v1 = make_record(0)
    rec, why, _, warns = R.validate_record(v1)
    assert why is None and not warns and rec.answer_source == "tag"
    assert rec.to_dict() == v1 and "answer_source" not in rec.to_dict()
    untagged = make_record(1, raw_generation="<think>R1</think>\nParis.", reasoning="R1",
                           answer="Paris.")
    rec, why, _, _ = R.validate_record(dict(untagged, answer_source="after_think"))
    assert why is None and rec.answer_source == "after_think"
    assert R.validate_record(dict(untagged, answer_source="tag"))[1] == "fields_disagree"
    assert R.validate_record(dict(v1, answer_source="guess"))[1] == "invalid_value"
    assert R.validate_record(dict(v1, answer_source=3))[1] == "wrong_type"
    out = tmp_path / "v2.jsonl"
    R.write_trace_jsonl(str(out), [untagged, v1])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["answer_source"] for x in lines] == ["after_think", "tag"]
    back, rep = R.read_trace_jsonl(str(out), strict=True)
    assert [r.answer_source for r in back] == ["after_think", "tag"] and not rep.warnings


# ---------------------------------------------------------------- reading the fixture


def test_read_fixture_counts_every_line():
    recs, rep = R.read_trace_jsonl(FIXTURE)
    assert rep.files == [SHARD0, SHARD1]
    assert (rep.n_lines, rep.n_records, rep.n_dropped) == (19, 8, 11)
    assert rep.per_file == {SHARD0: {"lines": 6, "records": 6}, SHARD1: {"lines": 13, "records": 2}}
    assert dict(rep.dropped) == {
        "blank_line": 1, "malformed_json": 1, "invalid_utf8": 1, "missing_field": 1,
        "wrong_type": 1, "missing </think>": 1, "duplicated <answer>": 1, "empty answer": 1,
        "fields_disagree": 1, "duplicate_record": 1, "not_an_object": 1}
    assert dict(rep.warnings) == {"unknown_field": 1}
    assert rep.samples["invalid_utf8"] == [f"{SHARD1}:5: byte 28: invalid continuation byte"]
    assert rep.samples["missing_field"] == [f"{SHARD1}:6: missing f1"]
    assert rep.samples["duplicate_record"][0].startswith(f"{SHARD1}:12: ")
    assert [r.key for r in recs] == [
        ("q1", "synthetic-teacher", "extract_v1", 0), ("q1", "synthetic-teacher", "extract_v1", 1),
        ("q2", "synthetic-teacher", "extract_v1", 0), ("q2", "synthetic-teacher", "extract_v1", 1),
        ("q3", "synthetic-teacher", "extract_v1", 0), ("q3", "synthetic-teacher", "extract_v1", 1),
        ("q4", "synthetic-teacher", "extract_v1", 0), ("q5", "synthetic-teacher", "extract_v1", 0)]
    q4 = recs[6]
    assert q4.extra == {"judge_notes": "unknown field kept as extra"}
    assert "judge_notes" not in q4.to_dict() and q4.to_dict(include_extra=True)["judge_notes"]
    # q5's raw text starts inside the prefilled think block
    assert recs[7].reasoning == "He moved to Lyon? No: she moved to Lyon."
    assert recs[7].answer == "Lyon"
    # the fixture's records equal the JSON of shard 0, field by field (independent json.loads)
    with open(SHARD0, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert [r.to_dict() for r in recs[:6]] == raw
    assert "read 2 file(s): 19 lines -> 8 records, 11 dropped" in rep.summary()


def test_selection_counts():
    recs, _ = R.read_trace_jsonl([SHARD0, SHARD1])
    got = {(s, c): len(R.select_records(recs, s, c)) for s in R.SELECTIONS for c in R.CRITERIA}
    assert got == {("correct", "lenient"): 5, ("incorrect", "lenient"): 3, ("all", "lenient"): 8,
                   ("correct", "strict_em"): 4, ("incorrect", "strict_em"): 4,
                   ("all", "strict_em"): 8}
    with pytest.raises(ValueError, match="criterion"):
        R.select_records(recs, "correct", "judge")


def test_strict_raises_with_file_and_line():
    recs, rep = R.read_trace_jsonl(SHARD0, strict=True)
    assert len(recs) == 6 and rep.n_dropped == 0
    with pytest.raises(R.TraceFormatError) as ei:
        R.read_trace_jsonl(FIXTURE, strict=True)
    e = ei.value
    assert isinstance(e, ValueError)
    assert (e.path, e.line, e.reason) == (SHARD1, 1, "unknown_field")
    assert str(e).startswith(f"{SHARD1}:1: unknown_field")


def test_strict_names_the_first_dropped_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(json.dumps(make_record(0)).encode() + b"\n{\"id\": 1\n")
    with pytest.raises(R.TraceFormatError, match=r"s\.jsonl:2: malformed_json"):
        R.read_trace_jsonl(str(p), strict=True)


def test_path_resolution_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.read_trace_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        R.read_trace_jsonl(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        R.read_trace_jsonl(str(tmp_path / "*.jsonl"))
    got = R.resolve_trace_paths([os.path.join(FIXTURE, "shard-*.jsonl"), SHARD0])
    assert got == [SHARD0, SHARD1]


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r.update(exact_match=float("nan")), "invalid_value"),
    (lambda r: r.update(f1=1.5), "invalid_value"),
    (lambda r: r.update(sample_index=-1), "invalid_value"),
    (lambda r: r.update(sample_index=True), "wrong_type"),
    (lambda r: r.update(gold_answers="Paris"), "wrong_type"),
    (lambda r: r.update(gold_answers=[]), "invalid_value"),  # answerable without gold
    (lambda r: r["decoding"].pop("seed"), "missing_field"),
    (lambda r: r["decoding"].update(top_p=0.0), "invalid_value"),
    (lambda r: r.update(decoding=[1]), "wrong_type"),
    (lambda r: r.update(answer="London"), "fields_disagree"),
])
def test_validation_reasons(mutate, reason):
    rec = make_record(3)
    mutate(rec)
    got, why, detail, _ = R.validate_record(rec)
    assert got is None and why == reason and detail


def test_lone_surrogate_and_duplicate_json_keys(tmp_path):
    p = tmp_path / "s.jsonl"
    good = json.dumps(make_record(1))
    surrogate = json.dumps(make_record(2)).replace('"Paris is', '"\\ud800 Paris is')
    dup_key = good[:-1] + ', "id": "other"}'
    p.write_text("\n".join([good, surrogate, dup_key]) + "\n", encoding="utf-8")
    recs, rep = R.read_trace_jsonl(str(p))
    assert len(recs) == 1
    assert dict(rep.dropped) == {"invalid_value": 1, "malformed_json": 1}
    assert "duplicated JSON key 'id'" in rep.samples["malformed_json"][0]


def test_crlf_bom_and_missing_final_newline(tmp_path):
    p = tmp_path / "s.jsonl"
    lines = [json.dumps(make_record(i)).encode() for i in range(3)]
    p.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))
    recs, rep = R.read_trace_jsonl(str(p), strict=True)
    assert [r.id for r in recs] == ["q0", "q1", "q2"] and rep.n_lines == 3


# ---------------------------------------------------------------- writing and export


def test_write_roundtrip_and_atomicity(tmp_path):
    out = tmp_path / "sub" / "shard.jsonl"
    recs, _ = R.read_trace_jsonl(FIXTURE)
    assert R.write_trace_jsonl(str(out), recs) == 8
    back, rep = R.read_trace_jsonl(str(out), strict=True)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]
    before = out.read_bytes()
    bad = [recs[0].to_dict(), dict(recs[1].to_dict(), f1="high")]
    with pytest.raises(R.TraceFormatError, match=r"shard\.jsonl:2: wrong_type: f1"):
        R.write_trace_jsonl(str(out), bad)
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["shard.jsonl"]  # no temp file left behind
    # an unparseable teacher output can be written; reading counts it
    unparseable = make_record(9, raw_generation="<think>R<answer>A</answer>", reasoning="R",
                              answer="A")
    unfinished = make_record(10, raw_generation="<think>R", reasoning="R", answer="")
    R.write_trace_jsonl(str(out), [make_record(8), unparseable, unfinished])
    back, rep = R.read_trace_jsonl(str(out))
    assert len(back) == 1 and dict(rep.dropped) == {"missing </think>": 1,
                                                    "unfinished <think>": 1}


def test_hf_dataset_and_parquet(tmp_path):
    import pyarrow.parquet as pq

    from regift_jax.data.records import traces_to_hf_dataset, write_traces_parquet

    ds, rep = traces_to_hf_dataset(FIXTURE, selection="correct", return_report=True)
    assert rep.n_records == 8 and len(ds) == 5
    assert ds.column_names == list(R.SCHEMA_FIELDS)
    with open(SHARD0, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    expected = [r for r in raw if r["lenient_correct"]]
    assert [ds[i] for i in range(4)] == expected  # q1/0, q1/1, q2/0, q3/1 (q4 is last)
    assert ds[4]["id"] == "q4"
    out = tmp_path / "t.parquet"
    n = write_traces_parquet(FIXTURE, str(out), selection="incorrect", criterion="strict_em")
    assert n == 4
    table = pq.read_table(str(out))
    assert table.schema.equals(R.arrow_schema())
    assert table.column("id").to_pylist() == ["q1", "q2", "q3", "q5"]
    assert table.column("decoding").to_pylist()[0] == raw[1]["decoding"]


# ---------------------------------------------------------------- property test

@st.composite
def _line(draw):
    kind = draw(st.sampled_from(["valid", "truncated", "bytes", "bad_utf8", "wrong_type",
                                 "missing", "extra", "text", "tags", "json_value"]))
    i = draw(st.integers(0, 50))
    rec = make_record(i, sample_index=i)
    if kind == "valid":
        line = json.dumps(rec).encode()
    elif kind == "truncated":
        s = json.dumps(rec).encode()
        line = s[: draw(st.integers(0, len(s) - 1))]
    elif kind == "bytes":
        line = draw(st.binary(max_size=80))
    elif kind == "bad_utf8":
        s = json.dumps(rec).encode()
        k = draw(st.integers(0, len(s)))
        line = s[:k] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + s[k:]
    elif kind == "wrong_type":
        field = draw(st.sampled_from(R.SCHEMA_FIELDS))
        rec[field] = draw(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                    st.text(max_size=5), st.lists(st.integers(), max_size=2)))
        line = json.dumps(rec).encode()
    elif kind == "missing":
        rec.pop(draw(st.sampled_from(R.SCHEMA_FIELDS)))
        line = json.dumps(rec).encode()
    elif kind == "extra":
        rec[draw(st.text(min_size=1, max_size=8))] = draw(st.integers())
        line = json.dumps(rec).encode()
    elif kind == "text":
        line = draw(st.text(max_size=60)).encode("utf-8", "surrogatepass")
    elif kind == "tags":
        raw = draw(st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "x",
                                             " ", "\n"]), max_size=10))
        raw = "".join(raw)
        r_, a_, _ = R.parse_teacher_output(raw)
        rec.update(raw_generation=raw, reasoning=r_, answer=a_)
        line = json.dumps(rec).encode()
    else:
        line = json.dumps(draw(st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=4),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
            max_leaves=6))).encode()
    return line.replace(b"\n", b" ")


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line(), max_size=12), crlf=st.booleans())
def test_property_every_line_is_a_record_or_counted(tmp_path, lines, crlf):
    p = tmp_path / "prop.jsonl"
    sep = b"\r\n" if crlf else b"\n"
    p.write_bytes(sep.join(lines) + (sep if lines else b""))
    recs, rep = R.read_trace_jsonl(str(p))
    assert rep.n_lines == len(lines)
    assert rep.n_records + rep.n_dropped == rep.n_lines
    assert len(recs) == rep.n_records
    assert set(rep.dropped) <= set(R.DROP_REASONS)
    assert set(rep.warnings) <= set(R.WARNING_REASONS)
    assert len({r.key for r in recs}) == len(recs)
    # strict mode: either the same clean result, or a TraceFormatError naming this file
    try:
        srecs, srep = R.read_trace_jsonl(str(p), strict=True)
    except R.TraceFormatError as e:
        assert e.path == str(p) and 1 <= e.line <= len(lines)
        assert rep.n_dropped or sum(rep.warnings.values())
    else:
        assert rep.n_dropped == 0 and not rep.warnings and len(srecs) == len(recs)
    # every kept record survives a write/read round trip unchanged
    if recs:
        out = tmp_path / "rt.jsonl"
        R.write_trace_jsonl(str(out), recs)
        back, brep = R.read_trace_jsonl(str(out))
        assert brep.n_dropped == 0
        assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]


def test_gzip_shards_read_like_plain_ones(tmp_path):
    import gzip
    import shutil
    d = tmp_path / "gz"
    d.mkdir()
    with open(SHARD0, "rb") as src, gzip.open(d / "shard-00000.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, rep_p = R.read_trace_jsonl(SHARD0)
    gz, rep_g = R.read_trace_jsonl(str(d))  # a directory finds *.jsonl.gz too
    assert [r.to_dict() for r in gz] == [r.to_dict() for r in plain]
    assert rep_g.n_dropped == rep_p.n_dropped
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(open(SHARD0).readline() + "{not json\n")
    with pytest.raises(R.TraceFormatError, match=r"bad\.jsonl\.gz:2: malformed_json"):
        R.read_trace_jsonl(str(bad), strict=True)


def test_truncated_gzip_shard_is_a_counted_tail(tmp_path):
    """A ``.jsonl.gz`` cut short keeps the lines before the cut and counts the rest as one
    ``truncated_tail`` line (never a bare EOFError); ``strict=True`` names the file and line."""
    import gzip
    lines = [json.dumps(make_record(i)) + "\n" for i in range(400)]
    whole = gzip.compress("".join(lines).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    recs, rep = R.read_trace_jsonl(str(cut))
    n = len(recs)
    assert 0 < n < 400 and [r.id for r in recs] == [f"q{i}" for i in range(n)]
    assert rep.dropped == {"truncated_tail": 1} and rep.n_lines == n + 1
    assert rep.samples["truncated_tail"][0].startswith(f"{cut}:{n + 1}: compressed stream")
    with pytest.raises(R.TraceFormatError, match=rf"cut\.jsonl\.gz:{n + 1}: truncated_tail"):
        R.read_trace_jsonl(str(cut), strict=True)
