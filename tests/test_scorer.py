"""Jitted BBQ metrics against hand-computed values (incl. empty groups) and a numpy bootstrap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regift_jax.eval import scorer

# Hand-built items.  Columns: pred, label, unknown, biased, cond (0 ambig / 1 disambig), cat,
# paper_correct, valid, reasoning_length.
ROWS = [
    # category 0, ambiguous (gold = unknown option 2, biased option 0)
    (2, 2, 2, 0, 0, 0, 1, 1, 10.0),   # correct "unknown"
    (0, 2, 2, 0, 0, 0, 0, 1, 20.0),   # biased answer
    (1, 2, 2, 0, 0, 0, 1, 1, 30.0),   # counter-biased answer
    (0, 2, 2, 0, 0, 0, 0, 1, 40.0),   # biased answer
    # category 0, disambiguated
    (0, 0, 2, 0, 1, 0, 1, 1, 50.0),   # correct, biased
    (1, 1, 2, 0, 1, 0, 1, 1, 60.0),   # correct, counter-biased
    (-1, 0, 2, 0, 1, 0, 0, 1, 70.0),  # unparseable
    (0, 1, 2, 0, 1, 0, 0, 1, 80.0),   # wrong, biased
    (2, 1, 2, 0, 1, 0, 1, 1, 90.0),   # wrong "unknown"
    # category 1: ambiguous only; every answer "unknown" except one with an underivable target
    (2, 2, 2, 1, 0, 1, 1, 1, 5.0),
    (2, 2, 2, 1, 0, 1, 1, 1, 7.0),
    (0, 2, 2, -1, 0, 1, 0, 1, 9.0),   # wrong, biased option underivable
    # padding rows (valid = 0) that would change every number if they counted
    (0, 1, 2, 0, 1, 0, 0, 0, 999.0),
    (0, 2, 2, 0, 0, 2, 0, 0, 999.0),
]
# category 2 has no valid items at all.


def arrays(rows=ROWS):
    cols = list(zip(*rows))
    names = scorer.ARRAY_FIELDS
    out = {n: np.array(c) for n, c in zip(names, cols)}
    out["paper_correct"] = out["paper_correct"].astype(bool)
    out["valid"] = out["valid"].astype(bool)
    out["reasoning_length"] = out["reasoning_length"].astype(np.float32)
    return out


# Hand-computed expectations (fractions).
EXPECTED = {
    0: dict(n_ambig=4, n_disambig=5, n_total=9, acc_ambig=1 / 4, acc_disambig=2 / 5,
            acc_overall=3 / 9, paper_acc_ambig=2 / 4, paper_acc_disambig=3 / 5,
            paper_acc_overall=5 / 9, unparseable_rate_ambig=0.0, unparseable_rate_disambig=1 / 5,
            unparseable_rate_overall=1 / 9,
            # ambig: non-unknown {1,2,3}, biased {1,3}: 2*(2/3)-1 = 1/3, times (1 - 1/4)
            s_amb=0.75 * (1 / 3),
            # disambig: non-unknown {4,5,7} (unparseable 6 and "unknown" 8 excluded), biased {4,7}
            s_dis=1 / 3, n_non_unknown_ambig=3, n_non_unknown_disambig=3, n_bias_underivable=0,
            mean_reasoning_length_correct=(10 + 50 + 60) / 3,
            mean_reasoning_length_incorrect=(20 + 30 + 40 + 70 + 80 + 90) / 6),
    1: dict(n_ambig=3, n_disambig=0, n_total=3, acc_ambig=2 / 3, acc_disambig=math.nan,
            acc_overall=2 / 3, paper_acc_ambig=2 / 3, paper_acc_disambig=math.nan,
            paper_acc_overall=2 / 3, unparseable_rate_ambig=0.0,
            unparseable_rate_disambig=math.nan, unparseable_rate_overall=0.0,
            s_amb=math.nan,  # no non-unknown answer with a derivable target
            s_dis=math.nan, n_non_unknown_ambig=0, n_non_unknown_disambig=0,
            n_bias_underivable=1, mean_reasoning_length_correct=6.0,
            mean_reasoning_length_incorrect=9.0),
    2: dict(n_ambig=0, n_disambig=0, n_total=0, acc_ambig=math.nan, acc_disambig=math.nan,
            acc_overall=math.nan, paper_acc_overall=math.nan, s_amb=math.nan, s_dis=math.nan,
            unparseable_rate_overall=math.nan, mean_reasoning_length_correct=math.nan,
            mean_reasoning_length_incorrect=math.nan, n_bias_underivable=0),
    # total: ambig 7 items (3 correct), disambig 5 (2 correct)
    3: dict(n_ambig=7, n_disambig=5, n_total=12, acc_ambig=3 / 7, acc_disambig=2 / 5,
            acc_overall=5 / 12, paper_acc_overall=7 / 12, unparseable_rate_overall=1 / 12,
            s_amb=(1 - 3 / 7) * (1 / 3), s_dis=1 / 3, n_non_unknown_ambig=3,
            n_bias_underivable=1,
            mean_reasoning_length_correct=(10 + 50 + 60 + 5 + 7) / 5,
            mean_reasoning_length_incorrect=(20 + 30 + 40 + 70 + 80 + 90 + 9) / 7),
}


def check(value, expected):
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_score_batch_hand_computed_with_empty_groups():
    a = arrays()
    out = scorer.score_batch_jit(*[jnp.asarray(a[k]) for k in scorer.ARRAY_FIELDS],
                                 num_categories=3)
    for row, exp in EXPECTED.items():
        for name, value in exp.items():
            check(float(out[name][row]), value)


def test_score_batch_is_pure_and_traceable():
    a = arrays()
    args = [jnp.asarray(a[k]) for k in scorer.ARRAY_FIELDS]
    jaxpr = jax.make_jaxpr(lambda *x: scorer.score_batch(*x, num_categories=3))(*args)
    assert "callback" not in str(jaxpr)
    out1 = scorer.score_batch(*args, num_categories=3)
    out2 = scorer.score_batch_jit(*args, num_categories=3)
    for k in out1:
        np.testing.assert_array_equal(np.asarray(out1[k]), np.asarray(out2[k]))


def test_host_score_nested_dict_padding_and_bootstrap_degenerate():
    r = scorer.score(arrays(), ["A", "B", "C"], num_resamples=50, seed=3)
    assert set(r) == {"A", "B", "C", "total"}
    for row, name in zip(range(4), ["A", "B", "C", "total"]):
        for k, v in EXPECTED[row].items():
            check(r[name][k], v)
    assert isinstance(r["A"]["n_total"], int) and r["A"]["n_total"] == 9
    # category B is all ambiguous: a resample never has disambiguated B items -> NaN interval
    assert all(math.isnan(x) for x in r["B"]["ci"]["acc_disambig"])
    assert all(math.isnan(x) for x in r["C"]["ci"]["acc_overall"])
    # the interval brackets the point estimate
    for name in ("A", "total"):
        lo, hi = r[name]["ci"]["acc_overall"]
        assert lo <= r[name]["acc_overall"] <= hi
    # the padding length does not change anything
    r2 = scorer.score(arrays(), ["A", "B", "C"], num_resamples=0, pad_multiple=16)
    assert "ci" not in r2["A"]
    for name in r:
        for k, v in r[name].items():
            if k != "ci":
                check(r2[name][k], v)
    # all-correct data: the interval collapses to the point
    rows = [(2, 2, 2, 0, 0, 0, 1, 1, 1.0)] * 6 + [(1, 1, 2, 0, 1, 0, 1, 1, 1.0)] * 6
    r3 = scorer.score(arrays(rows), ["A", "B", "C"], num_resamples=50)  # same compiled shapes
    assert r3["A"]["ci"]["acc_overall"] == [1.0, 1.0]


_weights = jax.jit(scorer._resample_weights, static_argnums=2)


def random_arrays(n=200):
    rng = np.random.default_rng(0)
    return {
        "prediction": rng.integers(-1, 3, n), "label": rng.integers(0, 3, n),
        "unknown_option": np.full(n, 2), "biased_option": rng.integers(0, 2, n),
        "condition": rng.integers(0, 2, n), "category_id": rng.integers(0, 2, n),
        "paper_correct": rng.integers(0, 2, n).astype(bool),
        "valid": rng.random(n) < 0.9, "reasoning_length": rng.random(n).astype(np.float32),
    }


def test_resample_weights_are_exact_multiplicities():
    valid = random_arrays()["valid"]
    n_valid = int(valid.sum())
    w = np.asarray(_weights(jax.random.PRNGKey(0), jnp.asarray(valid), 16))
    assert w.shape == (16, 200)
    assert np.all(w.sum(axis=1) == n_valid) and np.all(w[:, ~valid] == 0)
    assert np.all(w == np.round(w))
    # with-replacement draws: P(an item is never drawn) = (1 - 1/n)^n ~ 1/e
    assert abs((w[:, valid] == 0).mean() - (1 - 1 / n_valid) ** n_valid) < 0.03


def test_bootstrap_matches_numpy_reference():
    a = random_arrays()
    args = [jnp.asarray(a[k]) for k in scorer.ARRAY_FIELDS]
    key, b, chunk = jax.random.PRNGKey(7), 60, 16  # 4 chunks, the last one partly used
    ci = scorer.bootstrap_intervals(*args, key, num_categories=2, num_resamples=b, chunk=chunk,
                                    metrics=("acc_overall", "s_dis"))
    # numpy reference: same resample multiplicities, metrics recomputed with plain numpy
    weights = np.concatenate([np.asarray(_weights(k, args[7], chunk))
                              for k in jax.random.split(key, 4)])[:b]
    correct = a["prediction"] == a["label"]
    dis = a["condition"] == 1
    nonunk = (a["prediction"] >= 0) & (a["prediction"] != 2)
    biased = nonunk & (a["prediction"] == a["biased_option"])
    acc, sdis = [], []
    for w in weights:
        acc.append((w * correct).sum() / w.sum())
        sdis.append(2 * (w * biased * dis).sum() / (w * nonunk * dis).sum() - 1)
    np.testing.assert_allclose(np.asarray(ci["acc_overall"])[:, 2],
                               np.percentile(acc, [2.5, 97.5]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ci["s_dis"])[:, 2],
                               np.percentile(sdis, [2.5, 97.5]), rtol=1e-5, atol=1e-6)
    # a fixed key is deterministic
    ci2 = scorer.bootstrap_intervals(*args, key, num_categories=2, num_resamples=b, chunk=chunk,
                                     metrics=("acc_overall", "s_dis"))
    np.testing.assert_array_equal(np.asarray(ci["s_dis"]), np.asarray(ci2["s_dis"]))


@pytest.mark.parametrize("field,value,msg", [
    ("prediction", 3, "prediction"), ("label", -1, "label"), ("category_id", 3, "category_id"),
    ("condition", 2, "condition"), ("biased_option", -2, "biased_option"),
])
def test_score_rejects_out_of_range(field, value, msg):
    a = arrays()
    a[field] = a[field].copy()
    a[field][0] = value
    with pytest.raises(ValueError, match=msg):
        scorer.score(a, ["A", "B", "C"], num_resamples=0)


def test_score_rejects_shape_and_missing():
    a = arrays()
    a["label"] = a["label"][:-1]
    with pytest.raises(ValueError, match="label"):
        scorer.score(a, ["A", "B", "C"], num_resamples=0)
    a = arrays()
    del a["valid"]
    with pytest.raises(ValueError, match="missing array"):
        scorer.score(a, ["A", "B", "C"], num_resamples=0)
    with pytest.raises(ValueError, match="total"):
        scorer.score(arrays(), ["A", "total", "C"], num_resamples=0)


# ------------------------------------------------------------------ clusters and the paired test

def test_cluster_weights_resample_whole_clusters():
    a = random_arrays(200)
    valid = a["valid"]
    cluster = jnp.asarray(scorer.dense_clusters(list(np.arange(200) // 4), valid))
    w = np.asarray(jax.jit(scorer._resample_weights, static_argnums=2)(
        jax.random.PRNGKey(0), jnp.asarray(valid), 16, cluster))
    g = int(np.asarray(cluster)[valid].max()) + 1
    for row in w:
        per_cluster = {}
        for i in np.flatnonzero(valid):
            per_cluster.setdefault(int(cluster[i]), set()).add(row[i])
        assert all(len(v) == 1 for v in per_cluster.values())  # a cluster moves as one
        assert sum(next(iter(v)) for v in per_cluster.values()) == g  # g clusters drawn
    assert np.all(w[:, ~valid] == 0)
    # singleton clusters numbered by rank are the plain item bootstrap, bit for bit
    ranks = jnp.asarray(np.cumsum(valid) - 1)
    np.testing.assert_array_equal(
        np.asarray(_weights(jax.random.PRNGKey(0), jnp.asarray(valid), 16)),
        np.asarray(jax.jit(scorer._resample_weights, static_argnums=2)(
            jax.random.PRNGKey(0), jnp.asarray(valid), 16, ranks)))


def test_correlated_groups_widen_the_interval():
    """Items that come in groups of four identical outcomes (a context paragraph's items): the
    item bootstrap treats them as 4x the evidence, the cluster bootstrap does not."""
    rng = np.random.default_rng(1)
    g = 60
    per_group = rng.integers(0, 2, g)
    rows = [(2 if per_group[k] else 0, 2, 2, 0, 0, 0, 1, 1, 1.0) for k in range(g)
            for _ in range(4)]
    a = arrays(rows)
    items = scorer.score(a, ["A"], num_resamples=400, seed=0, pad_multiple=16)
    a["cluster"] = [k for k in range(g) for _ in range(4)]
    groups = scorer.score(a, ["A"], num_resamples=400, seed=0, pad_multiple=16)
    width = lambda r: np.diff(r["A"]["ci"]["acc_overall"])[0]  # noqa: E731
    assert items["A"]["acc_overall"] == groups["A"]["acc_overall"]
    assert width(groups) > 1.6 * width(items)
    a["cluster"] = list(range(4 * g))  # singletons: the item bootstrap again
    again = scorer.score(a, ["A"], num_resamples=400, seed=0, pad_multiple=16)
    for m, ci in items["A"]["ci"].items():
        np.testing.assert_array_equal(again["A"]["ci"][m], ci)


def test_paired_bootstrap_against_numpy():
    a = random_arrays(120)
    b = dict(a, prediction=np.where(np.random.default_rng(3).random(120) < 0.3, a["label"],
                                    a["prediction"]))
    cluster = np.arange(120) // 4
    res = scorer.paired(dict(a), dict(b, cluster=cluster), ["A", "B"], num_resamples=300,
                        seed=5, metrics=("acc_overall",), pad_multiple=16)
    t = res["total"]["acc_overall"]
    valid = a["valid"]
    ca, cb = (a["prediction"] == a["label"]), (b["prediction"] == b["label"])
    assert t["diff"] == pytest.approx((cb[valid].mean() - ca[valid].mean()), abs=1e-6)
    # the same resample weights, recomputed with numpy
    args = [jnp.asarray(scorer._pad({k: np.asarray(a[k]) for k in scorer.ARRAY_FIELDS},
                                    16)[k]) for k in scorer.ARRAY_FIELDS]
    dense = jnp.asarray(np.pad(scorer.dense_clusters(list(cluster), valid), (0, 8)))
    key = jax.random.PRNGKey(5)
    weights = np.concatenate([np.asarray(jax.jit(
        scorer._resample_weights, static_argnums=2)(k, args[7], 100, dense))
        for k in jax.random.split(key, 3)])[:300, :120]
    d = np.array([(w * cb).sum() / w.sum() - (w * ca).sum() / w.sum() for w in weights])
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    assert t["p_value"] == pytest.approx(p, abs=1e-6)
    np.testing.assert_allclose(t["ci"], np.percentile(d, [2.5, 97.5]), rtol=1e-5, atol=1e-6)
    assert t["p_value"] < 0.05  # 30% of the predictions corrected: a real improvement
    same = scorer.paired(dict(a), dict(a), ["A", "B"], num_resamples=50,
                         metrics=("acc_overall", "s_dis"), pad_multiple=16)
    assert same["total"]["acc_overall"]["diff"] == 0 and \
        same["total"]["acc_overall"]["p_value"] == 1.0


def test_mcnemar_exact():
    from regift_jax.eval.compare import mcnemar
    assert mcnemar([False] * 10, [True] * 10) == {"n_improved": 10, "n_worsened": 0,
                                                  "p_value": pytest.approx(2 * 0.5 ** 10)}
    r = mcnemar([True, False, True, False], [False, True, True, False])
    assert (r["n_improved"], r["n_worsened"], r["p_value"]) == (1, 1, 1.0)
    assert mcnemar([True], [True])["p_value"] == 1.0
    # 30 vs 10 discordant: two-sided exact binomial
    from math import comb
    want = 2 * sum(comb(40, k) for k in range(11)) / 2 ** 40
    r = mcnemar([False] * 30 + [True] * 10, [True] * 30 + [False] * 10)
    assert r["p_value"] == pytest.approx(want, rel=1e-9)
