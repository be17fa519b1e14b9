"""report.json strictness, the Markdown layout and the PNG plots."""

import json
import math

import numpy as np

from regift_jax.eval import report


def metrics(acc, s_dis, nan_disambig=False):
    m = {
        "n_ambig": 10, "n_disambig": 0 if nan_disambig else 10,
        "n_total": 10 if nan_disambig else 20,
        "acc_ambig": acc, "acc_disambig": math.nan if nan_disambig else acc / 2,
        "acc_overall": acc * 0.75, "paper_acc_ambig": 0.5, "paper_acc_disambig": 0.25,
        "paper_acc_overall": 0.375, "unparseable_rate_ambig": 0.1,
        "unparseable_rate_disambig": 0.0, "unparseable_rate_overall": 0.05,
        "s_dis": math.nan if nan_disambig else s_dis, "s_amb": s_dis / 2,
        "n_non_unknown_ambig": 3, "n_non_unknown_disambig": 9, "n_bias_underivable": 0,
        "mean_reasoning_length_correct": 100.0, "mean_reasoning_length_incorrect": 150.5,
    }
    m["ci"] = {"acc_overall": [m["acc_overall"] - 0.05, m["acc_overall"] + 0.05],
               "s_dis": [math.nan, math.nan] if nan_disambig else [s_dis - 0.1, s_dis + 0.1],
               "s_amb": [s_dis / 2 - 0.1, s_dis / 2 + 0.1]}
    return m


def make_report(scale=1.0):
    cats = ["Religion", "Age", "Sexual_orientation"]
    return {
        "title": "unit",
        "categories": cats,
        "metrics": {"Religion": metrics(0.8 * scale, 0.2), "Age": metrics(0.6 * scale, -0.1),
                    "Sexual_orientation": metrics(0.4, 0.3, nan_disambig=True),
                    "total": metrics(0.6, 0.1)},
        "input": {"n_rows": 30, "n_unknown_example_ids": 1, "unknown_example_ids": ["x"]},
        "parse": {"n_unparseable": 2},
        "notes": ["a note"],
        "items": [{"example_id": 1, "correct": np.bool_(True), "len": np.int64(3)}],
    }


def test_to_jsonable_and_strict_json(tmp_path):
    r = make_report()
    out = report.to_jsonable(r)
    assert out["metrics"]["Sexual_orientation"]["acc_disambig"] is None
    assert out["metrics"]["Sexual_orientation"]["ci"]["s_dis"] == [None, None]
    assert out["items"][0] == {"example_id": 1, "correct": True, "len": 3}
    path = tmp_path / "r.json"
    report.write_json(str(path), r)

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")
    loaded = json.loads(path.read_text(), parse_constant=no_constants)
    assert loaded["metrics"]["Religion"]["acc_ambig"] == 0.8


def test_markdown_paper_layout_and_values():
    md = report.markdown_report(make_report())
    lines = md.splitlines()
    assert lines[0] == "# unit"
    header = next(l for l in lines if l.startswith("| Judgement"))
    # paper categories present, in the paper's order (Age before Religion), three columns each
    assert header == ("| Judgement | Age Ambig | Age Disambig | Age Overall | Religion Ambig | "
                      "Religion Disambig | Religion Overall |")
    std = next(l for l in lines if l.startswith("| standard |"))
    assert std == "| standard | 60.00 | 30.00 | 45.00 | 80.00 | 40.00 | 60.00 |"
    paper = next(l for l in lines if l.startswith("| paper exact match |"))
    assert paper.split(" | ")[1:4] == ["50.00", "25.00", "37.50"]
    bias = next(l for l in lines if l.startswith("| Religion | 20.0"))
    assert "20.0 [10.0, 30.0]" in bias and "10.0 [0.0, 20.0]" in bias
    # the non-paper category appears in the full table, with dashes for empty groups
    so_rows = [l for l in lines if l.startswith("| Sexual_orientation |")]
    assert len(so_rows) == 2 and "| — |" in so_rows[0] and "| — |" in so_rows[1]
    assert "- a note" in md and "n_unknown_example_ids = 1" in md


def test_comparison_markdown():
    md = report.comparison_markdown(make_report(), make_report(scale=0.5), ("base", "regift"))
    row = next(l for l in md.splitlines() if l.startswith("| Religion |"))
    assert row.split(" | ")[1] == "80.0 → 40.0"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_and_write_all(tmp_path):
    p = report.plot_report(make_report(), str(tmp_path / "a.png"))
    assert _is_png(p)
    p = report.plot_comparison(make_report(), make_report(0.5), str(tmp_path / "c.png"))
    assert _is_png(p)
    # a comparison against a report read back from JSON (NaN stored as null)
    before = json.loads(json.dumps(report.to_jsonable(make_report())))
    paths = report.write_all(make_report(0.5), str(tmp_path / "out"), compare_with=before)
    for k in ("json", "markdown", "plot", "comparison_markdown", "comparison_plot"):
        assert (tmp_path / "out" / paths[k].split("/")[-1]).exists()
    assert _is_png(paths["plot"]) and _is_png(paths["comparison_plot"])


def test_cut_off_count_and_the_paired_p_values_in_markdown():
    records = [{"category": c, "finish_reason": f} for c, f in
               (("Age", "length"), ("Age", "eos"), ("Religion", "stop"), ("Religion", "length"),
                ("Religion", "length"))]
    c = report.cut_off_summary(records, {"max_new_tokens": None, "max_total_tokens": 2048})
    assert c == {"n_cut_off": 3, "n_items": 5, "rate": 0.6,
                 "by_category": {"Age": 1, "Religion": 2}, "max_new_tokens": None,
                 "max_total_tokens": 2048}
    rep = dict(make_report(), cut_off=c)
    line = "cut off by the token budget (max_total_tokens=2048): 3 of 5 generations (60.0%)"
    assert report.cut_off_line(rep) == line
    assert f"Generations {line}." in report.markdown_report(rep)
    assert report.cut_off_line(make_report()) is None
    after = make_report(scale=0.5)
    after["comparison"] = {
        "method": "paired", "n_paired": 20, "resamples": 100, "confidence": 0.95,
        "unit": "context groups", "mcnemar": {"total": {"n_improved": 1, "n_worsened": 6,
                                                         "p_value": 0.125}},
        "metrics": {"Religion": {"acc_ambig": {"diff": -0.4, "p_value": 0.031}}}}
    md = report.comparison_markdown(make_report(), after, ("base", "regift"))
    row = next(l for l in md.splitlines() if l.startswith("| Religion |"))
    assert row.split(" | ")[1] == "80.0 → 40.0 (-40.0, p=0.03)"  # acc_ambig, tested
    assert row.split(" | ")[2] == "40.0 → 20.0"  # acc_disambig: no test, no p-value
    assert "1 items wrong -> right, 6 right -> wrong, p=0.12" in md
