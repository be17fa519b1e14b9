"""The evaluate CLI: the authors' released generations end to end (subprocess), bad input."""

import json
import os
import re
import subprocess
import sys

import pytest

from regift_jax import evaluate, models
from _data import REPO, SHARED, bbq_dir, cli_env

FIXTURE = os.path.join(SHARED, "regift_paper_outputs", "only_correct_checkpoint_31761_religion")




def test_help_documents_flags():
    out = subprocess.run([sys.executable, "-m", "regift_jax.evaluate", "--help"], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--generations", "--category", "--out", "--bbq_dir", "--tie_break",
                 "--bootstrap_resamples", "--reference_static", "--compare", "--strict"):
        assert flag in out.stdout


def test_cli_on_authors_only_correct_fixture(tmp_path):
    if not os.path.isdir(FIXTURE):
        pytest.skip(f"authors' released outputs not found at {FIXTURE} (set REGIFT_SHARED_DATA)")
    stats_path = os.path.join(FIXTURE, "evaluation_stats.json")
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "regift_jax.evaluate",
           f"--generations={os.path.join(FIXTURE, 'checkpoint_31761_final_with_context.json')}",
           "--category=Religion", f"--out={out_dir}", f"--bbq_dir={bbq_dir()}",
           f"--reference_static={stats_path}", "--bootstrap_resamples=200"]
    res = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    printed = re.search(r"reference agreement: correct ([\d.]+)% prediction_text ([\d.]+)%",
                        res.stdout)
    assert printed and float(printed.group(1)) >= 99.5 and float(printed.group(2)) >= 99.5
    acc = re.search(r"Religion: n=1200 .*paper_exact_match=([\d.]+)%", res.stdout)
    assert acc and abs(float(acc.group(1)) - 74.33) < 0.1

    rep = json.loads((out_dir / "report.json").read_text())
    assert (out_dir / "report.md").exists() and (out_dir / "bbq.png").exists()
    items = rep["items"]
    assert len(items) == 1200
    assert rep["input"]["n_items_without_generation"] == 0
    assert rep["input"]["n_unknown_example_ids"] == 0
    for key in ("example_id", "answer_text", "option_index", "paper_exact_match",
                "paper_answer_text", "correct", "span_source", "reasoning_length_words"):
        assert key in items[0]
    # independent check of per-item agreement against the authors' released judgements
    with open(stats_path) as f:
        ref = {r["example_id"]: r for r in json.load(f)["static"]["results"]}
    same = sum(ref[it["example_id"]]["correct"] == it["paper_exact_match"] for it in items)
    same_text = sum(ref[it["example_id"]]["prediction"] == it["paper_answer_text"]
                    for it in items)
    assert same / 1200 >= 0.995 and same_text / 1200 >= 0.995
    m = rep["metrics"]["Religion"]
    assert abs(100 * m["paper_acc_overall"] - 74.33) < 0.1
    assert rep["metrics"]["total"]["n_total"] == 1200
    # the jitted metrics equal a plain-Python recomputation from the per-item list
    assert m["acc_overall"] == pytest.approx(sum(it["correct"] for it in items) / 1200,
                                             abs=1e-6)
    dis = [it for it in items if it["context_condition"] == "disambig"
           and it["option_index"] >= 0 and it["option_index"] != it["unknown_option"]]
    s_dis = 2 * sum(it["option_index"] == it["biased_option"] for it in dis) / len(dis) - 1
    assert m["s_dis"] == pytest.approx(s_dis, abs=1e-6)
    assert m["n_non_unknown_disambig"] == len(dis)
    lo, hi = m["ci"]["acc_overall"]
    assert lo < m["acc_overall"] < hi
    assert m["unparseable_rate_overall"] == pytest.approx(
        sum(it["option_index"] == -1 for it in items) / 1200, abs=1e-6)


# ------------------------------------------------------------------ bad input (in process)

@pytest.fixture()
def small_bbq(tmp_path):
    src = bbq_dir()
    d = tmp_path / "bbq"
    d.mkdir()
    for cat, n in (("Religion", 8), ("Age", 4)):
        with open(os.path.join(src, f"{cat}.jsonl")) as f:
            lines = [next(f) for _ in range(n)]
        (d / f"{cat}.jsonl").write_text("".join(lines))
    return d


def _religion_rows(small_bbq):
    with open(small_bbq / "Religion.jsonl") as f:
        return [json.loads(l) for l in f]


def _run(tmp_path, small_bbq, rows, *extra, category="Religion", name="g.jsonl"):
    g = tmp_path / name
    g.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = evaluate.main([f"--generations={g}", f"--category={category}", f"--out={out}",
                        f"--bbq_dir={small_bbq}", "--bootstrap_resamples=0", *extra])
    rep = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, rep, str(g)


def test_bad_rows_are_counted_not_dropped(tmp_path, small_bbq, capsys):
    rows = _religion_rows(small_bbq)
    gens = [
        {"example_id": rows[0]["example_id"],
         "generation": "</think> <answer>Can't answer</answer>"},
        {"example_id": rows[1]["example_id"], "generation": ""},          # empty generation
        {"example_id": 999, "generation": "The Muslim one."},               # unknown id
        {"generation": "no id"},                                            # malformed
        {"example_id": rows[3]["example_id"], "text": "wrong key"},         # malformed
        {"example_id": rows[4]["example_id"], "generated_text": "Not in background."},
    ]
    rc, rep, g = _run(tmp_path, small_bbq, gens)
    assert rc == 0
    inp = rep["input"]
    assert inp["n_rows"] == 6
    assert inp["n_malformed_rows"] == 2 and inp["malformed_rows"][0].startswith(f"{g}:4")
    assert inp["n_unknown_example_ids"] == 1 and "example_id 999" in inp["unknown_example_ids"][0]
    assert inp["n_empty_generations"] == 1
    assert inp["n_items_without_generation"] == 8 - 3
    assert rep["metrics"]["Religion"]["n_total"] == 3
    by_id = {it["example_id"]: it for it in rep["items"]}
    assert by_id[rows[1]["example_id"]]["option_index"] == -1
    assert by_id[rows[1]["example_id"]]["span_source"] == "empty"
    assert by_id[rows[0]["example_id"]]["option_index"] == [
        i for i in range(3) if rows[0]["answer_info"][f"ans{i}"][1] == "unknown"][0]
    printed = capsys.readouterr().out
    assert "unknown_ids=1" in printed and "items_without_generation=5" in printed
    rc, _, _ = _run(tmp_path, small_bbq, gens, "--strict")
    assert rc == 2
    assert "--strict" in capsys.readouterr().err


@pytest.mark.parametrize("case,msg", [
    ("duplicate", r"g\.jsonl:2: duplicate generation for Religion example_id"),
    ("condition", r"g\.jsonl:1: context_condition 'nonsense'"),
    ("json", r"g\.jsonl:2: invalid JSON"),
    ("category", r"no data for category 'Gender_identity'"),
    ("unknown_category", r"unknown BBQ category 'Astrology'"),
])
def test_errors_exit_2_with_location(tmp_path, small_bbq, capsys, case, msg):
    rows = _religion_rows(small_bbq)
    first = {"example_id": rows[0]["example_id"], "generation": "x"}
    gens, category = [first], "Religion"
    if case == "duplicate":
        gens = [first, first]
    elif case == "condition":
        gens = [dict(first, context_condition="nonsense")]
    elif case == "json":
        gens = [first, "{broken"]
    elif case == "category":
        category = "Gender_identity"
    elif case == "unknown_category":
        category = "Astrology"
    rc, _, _ = _run(tmp_path, small_bbq, gens, category=category)
    assert rc == 2
    assert re.search(msg, capsys.readouterr().err)


def test_authors_json_list_multi_category_and_compare(tmp_path, small_bbq):
    rows = _religion_rows(small_bbq)
    with open(small_bbq / "Age.jsonl") as f:
        age = [json.loads(l) for l in f]
    gens = [{"example_id": r["example_id"], "category": "Religion",
             "generated_text": f"r</think><answer>{r['ans' + str(r['label'])]}</answer>"}
            for r in rows]
    gens += [{"example_id": r["example_id"], "category": "Age", "generation": "Unknown."}
             for r in age]
    rc, rep, _ = _run(tmp_path, small_bbq, gens, category="Religion,Age")
    assert rc == 0
    assert rep["metrics"]["Religion"]["acc_overall"] == 1.0
    assert rep["metrics"]["Religion"]["paper_acc_overall"] == 1.0
    assert rep["metrics"]["Age"]["n_total"] == 4 and rep["metrics"]["total"]["n_total"] == 12
    # without a category field several categories are ambiguous -> error
    bare = [{"example_id": 0, "generation": "x"}]
    rc, _, _ = _run(tmp_path, small_bbq, bare, category="Religion,Age", name="bare.jsonl")
    assert rc == 2
    # the authors' JSON-list format, compared with the previous report
    (tmp_path / "before.json").write_text(json.dumps(rep))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"example_id": r["example_id"], "prompt": "p",
                                   "generated_text": "Not in background.",
                                   "context_condition": r["context_condition"]} for r in rows]))
    out = tmp_path / "out2"
    rc = evaluate.main([f"--generations={listed}", "--category=Religion", f"--out={out}",
                        f"--bbq_dir={small_bbq}", "--bootstrap_resamples=0",
                        f"--compare={tmp_path / 'before.json'}", "--compare_labels=a,b"])
    assert rc == 0
    rep2 = json.loads((out / "report.json").read_text())
    n_ambig = sum(r["context_condition"] == "ambig" for r in rows)
    assert rep2["metrics"]["Religion"]["acc_overall"] == pytest.approx(n_ambig / len(rows))
    assert (out / "comparison.md").read_text().startswith("# BBQ: a vs b")
    assert (out / "comparison.png").exists()


# ------------------------------------------------------------------ checks before any work

@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model is loaded."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the output checks")
    monkeypatch.setattr(models, "load", load)


def _model_argv(tmp_path, small_bbq, *extra):
    return ["--model=smollm2-135m-instruct", "--mode=generate", f"--bbq_dir={small_bbq}",
            "--categories=Religion", *extra]


def _one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err


def test_unwritable_out_fails_before_model_work(tmp_path, small_bbq, capsys, no_model,
                                                monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = evaluate.main(_model_argv(tmp_path, small_bbq, f"--out={blocker}/out"))
    assert rc == 2
    _one_line_error(capsys, r"--out=.*a_file/out: cannot write there")
    rc = evaluate.main(_model_argv(tmp_path, small_bbq, f"--out={blocker}"))
    assert rc == 2
    _one_line_error(capsys, r"--out=.*a_file: cannot write there")
    # a read-only file system: the probe file cannot be created
    import errno
    import tempfile as tempfile_mod

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile_mod, "mkstemp", read_only)
    rc = evaluate.main(_model_argv(tmp_path, small_bbq, f"--out={tmp_path / 'ro'}"))
    assert rc == 2
    _one_line_error(capsys, r"cannot write there \(Read-only file system\)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path, small_bbq, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert evaluate.main(_model_argv(tmp_path, small_bbq, f"--out={ro}")) == 2
    finally:
        ro.chmod(0o755)
    _one_line_error(capsys, r"cannot write there \(Permission denied\)")


@pytest.mark.parametrize("flag,pattern", [
    ("--compare", r"missing\.json: not a readable report\.json"),
    ("--reference_static", r"missing\.json: --reference_static file not found"),
])
def test_bad_compare_inputs_fail_before_model_work(tmp_path, small_bbq, capsys, no_model,
                                                   flag, pattern):
    rc = evaluate.main(_model_argv(tmp_path, small_bbq, f"--out={tmp_path / 'out'}",
                                   f"{flag}={tmp_path / 'missing.json'}"))
    assert rc == 2
    _one_line_error(capsys, pattern)


def test_stereoset_file_is_checked_before_model_work(tmp_path, capsys, no_model):
    rc = evaluate.main(["--model=smollm2-135m-instruct", "--mode=stereoset",
                        f"--stereoset_file={tmp_path / 'nope.jsonl'}", f"--out={tmp_path}"])
    assert rc == 2
    _one_line_error(capsys, r"nope\.jsonl: StereoSet file not found")


def test_write_failure_is_one_line(tmp_path, small_bbq, capsys, monkeypatch):
    import errno
    from regift_jax.eval import report as report_lib

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report_lib, "write_all", full)
    rows = _religion_rows(small_bbq)
    rc, _, _ = _run(tmp_path, small_bbq, [{"example_id": rows[0]["example_id"],
                                           "generation": "Unknown."}])
    assert rc == 2
    _one_line_error(capsys, r"No space left on device")


def test_cli_errors_are_one_line_without_traceback(tmp_path, small_bbq):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"example_id": 0, "generation": "x"}) + "\n")
    for argv in ([f"--generations={g}", "--category=Religion", f"--out={blocker}/o",
                  f"--bbq_dir={small_bbq}"],
                 [f"--generations={g}", "--category=Religion", f"--out={tmp_path / 'o'}",
                  f"--bbq_dir={small_bbq}", f"--compare={tmp_path / 'nope.json'}"]):
        res = subprocess.run([sys.executable, "-m", "regift_jax.evaluate", *argv], cwd=REPO,
                             env=cli_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
        assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ the paired before/after test

def test_compare_adds_the_paired_test_with_p_values(tmp_path, small_bbq, capsys):
    rows = _religion_rows(small_bbq)
    unknown = lambda r: [r[f"ans{i}"] for i in range(3)  # noqa: E731
                         if r["answer_info"][f"ans{i}"][1] == "unknown"][0]
    right = [{"example_id": r["example_id"],
              "generation": f"<answer>{r['ans' + str(r['label'])]}</answer>"} for r in rows]
    wrong = [{"example_id": r["example_id"], "generation": "<answer>"
              + (unknown(r) if r["context_condition"] == "disambig" else
                 [r[f"ans{i}"] for i in range(3) if r[f"ans{i}"] != unknown(r)][0])
              + "</answer>"} for r in rows]
    rc, before, _ = _run(tmp_path, small_bbq, wrong, "--bootstrap_resamples=200")
    assert rc == 0 and before["metrics"]["total"]["acc_overall"] == 0.0
    (tmp_path / "before.json").write_text(json.dumps(before))
    capsys.readouterr()
    rc, after, _ = _run(tmp_path, small_bbq, right, "--bootstrap_resamples=200",
                        f"--compare={tmp_path / 'before.json'}")
    assert rc == 0
    cmp = after["comparison"]
    assert cmp["n_paired"] == 8 and cmp["unit"].startswith("context groups")
    t = cmp["metrics"]["total"]["acc_overall"]
    assert t["before"] == 0.0 and t["after"] == 1.0 and t["diff"] == 1.0
    assert t["p_value"] < 0.05 and t["ci"][0] > 0  # every resample improves
    assert cmp["mcnemar"]["total"] == {"n_improved": 8, "n_worsened": 0,
                                       "p_value": pytest.approx(2 * 0.5 ** 8)}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "0.0 → 100.0 (+100.0, p=0.00)" in md and "McNemar" in md
    assert "acc_overall +100.00 (p=0.00)" in capsys.readouterr().out
    # the same generations twice: no change, p = 1
    (tmp_path / "after.json").write_text(json.dumps(after))
    rc, same, _ = _run(tmp_path, small_bbq, right, "--bootstrap_resamples=50",
                       f"--compare={tmp_path / 'after.json'}")
    t = same["comparison"]["metrics"]["total"]["acc_overall"]
    assert rc == 0 and t["diff"] == 0.0 and t["p_value"] == 1.0
    # every interval resamples context groups
    assert same["bootstrap"]["unit"].startswith("context groups")
    assert {it["context_group"] for it in same["items"]} == {
        f"Religion:{rows[0]['example_id']}", f"Religion:{rows[4]['example_id']}"}
