"""StereoSet loading and the official LM / SS / ICAT metric math on hand-computed values."""

import json
import math
import os

import numpy as np
import pytest

from regift_jax.eval import stereoset as ss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def data_file():
    for d in (os.path.join(REPO, "data", "stereoset"), os.path.join(SHARED, "stereoset")):
        p = os.path.join(d, "stereoset_dev_flat.jsonl")
        if os.path.exists(p):
            return p
    pytest.skip("stereoset_dev_flat.jsonl not found in data/stereoset or the shared folder")


def item(split, target, domain):
    return ss.StereoSetItem(split, target, domain, "ctx", "s", "a", "u")


def test_metrics_hand_computed():
    items = [
        item("intrasentence", "A", "gender"),   # pro, related 2
        item("intrasentence", "A", "gender"),   # anti (tie counts as anti), related 1
        item("intrasentence", "B", "race"),     # pro, related 0
        item("intersentence", "A", "gender"),   # anti, related 2
    ]
    scores = np.array([
        [-1.0, -2.0, -3.0],   # s > a: pro;  s > u, a > u: related 2
        [-1.0, -1.0, -1.5],   # s == a: anti (official tie rule);  related 2
        [-1.0, -2.0, -0.5],   # pro;  s < u, a < u: related 0
        [-2.0, -1.0, -3.0],   # anti;  related 2
    ])
    out = ss.stereoset_metrics(items, scores)
    # intrasentence: term A: pro 1 / total 2 -> ss 50, related 4 / 4 -> lm 100;
    #                term B: pro 1 / 1 -> ss 100, related 0 / 2 -> lm 0
    intra = out["intrasentence"]["overall"]
    assert intra["count"] == 3
    assert intra["ss_score"] == pytest.approx(75.0)
    assert intra["lm_score"] == pytest.approx(50.0)
    assert intra["icat_score"] == pytest.approx(50.0 * 25.0 / 50.0)
    g = out["intrasentence"]["gender"]
    assert (g["count"], g["ss_score"], g["lm_score"], g["icat_score"]) == (2, 50.0, 100.0, 100.0)
    r = out["intrasentence"]["race"]
    assert (r["ss_score"], r["lm_score"], r["icat_score"]) == (100.0, 0.0, 0.0)
    inter = out["intersentence"]["overall"]
    assert (inter["count"], inter["ss_score"], inter["lm_score"], inter["icat_score"]) == \
        (1, 0.0, 100.0, 0.0)
    # overall pools term A across splits: pro 1/3, related 6/6; term B: pro 1/1, related 0/2
    o = out["overall"]
    assert o["count"] == 4
    assert o["ss_score"] == pytest.approx((100 / 3 + 100) / 2)
    assert o["lm_score"] == pytest.approx((100 + 0) / 2)
    assert o["icat_score"] == pytest.approx(50 * min(o["ss_score"], 100 - o["ss_score"]) / 50)


def test_ideal_and_stereotyped_models():
    items = [item("intrasentence", t, "race") for t in ("A", "A", "B", "B")]
    ideal = np.array([[0.0, -1, -5], [-1, 0.0, -5], [0.0, -1, -5], [-1, 0.0, -5]])
    o = ss.stereoset_metrics(items, ideal)["overall"]
    assert (o["lm_score"], o["ss_score"], o["icat_score"]) == (100.0, 50.0, 100.0)
    stereo = np.array([[0.0, -1, -5]] * 4)
    o = ss.stereoset_metrics(items, stereo)["overall"]
    assert (o["lm_score"], o["ss_score"], o["icat_score"]) == (100.0, 100.0, 0.0)
    random_lm = np.array([[-5.0, -6, 0]] * 4)  # unrelated always preferred
    o = ss.stereoset_metrics(items, random_lm)["overall"]
    assert o["lm_score"] == 0.0 and o["icat_score"] == 0.0


def test_metric_input_checks():
    items = [item("intrasentence", "A", "race")]
    with pytest.raises(ValueError, match="shape"):
        ss.stereoset_metrics(items, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        ss.stereoset_metrics(items, np.array([[0.0, np.nan, 1.0]]))


def test_load_real_file_and_requests():
    path = data_file()
    items = ss.load_stereoset(path)
    assert len(items) == 4229
    assert sum(it.split == "intrasentence" for it in items) == 2106
    assert sum(it.split == "intersentence" for it in items) == 2123
    by_domain = {d: sum(it.bias_type == d for it in items)
                 for d in ("race", "profession", "gender", "religion")}
    assert by_domain == {"race": 1938, "profession": 1637, "gender": 497, "religion": 157}
    intra = ss.load_stereoset(path, splits=("intrasentence",))
    assert len(intra) == 2106
    reqs = ss.scoring_requests(items[:2])
    first = items[0]
    assert len(reqs) == 6
    if first.split == "intersentence":
        assert reqs[0] == (first.context, " " + first.stereotype)
    else:
        assert reqs[0] == ("", first.stereotype)
    assert [r[1].strip() for r in reqs[:3]] == list(first.sentences)


def test_score_with_callable_on_real_items():
    items = ss.load_stereoset(data_file())[:300]
    # a toy "model": prefers shorter continuations (per-character log-likelihood stand-in)
    scores = ss.score_with(items, lambda reqs: [-len(c) for _, c in reqs])
    assert scores.shape == (300, 3)
    assert scores[0, 0] == -len(ss.scoring_requests(items[:1])[0][1])
    out = ss.stereoset_metrics(items, scores)
    for split in ("intrasentence", "intersentence"):
        for v in out[split]["overall"].values():
            assert math.isfinite(v)
    with pytest.raises(ValueError, match="expected"):
        ss.score_with(items, lambda reqs: [0.0])


def test_load_errors_name_file_and_line(tmp_path):
    good = {"type": "intrasentence", "target": "t", "bias_type": "race", "context": "c BLANK",
            "stereotype": "s", "anti-stereotype": "a", "unrelated": "u"}
    bad = dict(good)
    del bad["unrelated"]
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ss.StereoSetFormatError, match=r"s\.jsonl:2: missing or empty.*unrelated"):
        ss.load_stereoset(str(p))
    p.write_text(json.dumps(dict(good, type="other")) + "\n")
    with pytest.raises(ss.StereoSetFormatError, match=r":1: type 'other'"):
        ss.load_stereoset(str(p))
    p.write_text("{oops\n")
    with pytest.raises(ss.StereoSetFormatError, match=r":1: invalid JSON"):
        ss.load_stereoset(str(p))
    with pytest.raises(ValueError, match="unknown StereoSet split"):
        ss.load_stereoset(str(p), splits=("nope",))
