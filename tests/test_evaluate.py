"""The evaluate CLI: the authors' released generations end to end (subprocess), bad input."""

import json
import os
import re
import subprocess
import sys

import pytest

from regift_jax.eval import evaluate
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
