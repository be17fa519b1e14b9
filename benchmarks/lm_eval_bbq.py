"""lm-eval's ``bbq`` task, item by item: lm-eval's Hugging Face backend vs the ``regift_jax`` one.

    python benchmarks/lm_eval_bbq.py --items 300 --seed 0 [--batch_size 8] [--json out.json] [--cache_dir DIR]

What runs
---------
The same N BBQ items (drawn with ``--seed`` across the vendored categories, as evenly as the
counts allow: :func:`draw_items`) go through lm-eval 0.4.13's ``bbq`` task (the offline copy over
the vendored files, :mod:`regift_jax.eval.harness`; 12 choices per item, prompt
``"{context}\\n\\nQ: {question}\\nA:"``) twice, with ``lm_eval.simple_evaluate``:

* **hf**: ``lm_eval.models.huggingface.HFLM`` (transformers + torch, float32, CPU) on
  SmolLM2-135M-Instruct exported as a Hugging Face directory
  (``regift_jax.models.load(model).export(dir)``);
* **regift_jax**: :class:`regift_jax.eval.harness.RegiftLM` on the same loaded model (float32).

Printed: per-item agreement of the chosen option (argmax of the 12 summed log-likelihoods), the
largest log-likelihood difference over all item x choice pairs, every disagreement with the gap
between HF's two best choices, both metric tables (accuracy, accuracy_amb, accuracy_disamb,
amb_bias_score, disamb_bias_score; recomputed with the task's own ``process_results`` and
aggregations, and checked against ``simple_evaluate``'s), the regift_jax table again with
near-tie disagreements (HF top-2 gap < ``--tie``) given HF's choice, and the speed: wall and
process CPU seconds of the model calls (``loglikelihood``; JAX compilation included) and of the
whole ``simple_evaluate`` call, with the ratio hf / regift_jax; then (``--own_format``, on by
default) the project's own ``loglik.format=lm_eval`` mode on the same items, without lm-eval, and
its per-item agreement with the regift_jax backend.  The last line is
``per-item agreement: X%``.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from regift_jax import models  # noqa: E402
from regift_jax.core.io import atomic_write_json  # noqa: E402
from regift_jax.data import bbq as bbq_data  # noqa: E402
from regift_jax.eval import config as eval_config, harness, tasks  # noqa: E402

METRICS = ("acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score", "disamb_bias_score")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load_avg() -> str:
    try:
        a = os.getloadavg()
        return f"load average {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"


def draw_items(docs, n: int, seed: int) -> list:
    """``n`` doc indices spread over the categories (``n // C`` each, the remainder to the first
    categories in order), drawn without replacement with ``np.random.default_rng(seed)``."""
    cats = list(dict.fromkeys(docs["category"]))
    by_cat = {c: [i for i, x in enumerate(docs["category"]) if x == c] for c in cats}
    rng = np.random.default_rng(seed)
    out = []
    for j, c in enumerate(cats):
        k = n // len(cats) + (1 if j < n % len(cats) else 0)
        if k > len(by_cat[c]):
            raise SystemExit(f"--items {n}: category {c} has only {len(by_cat[c])} items")
        out.extend(int(i) for i in rng.choice(by_cat[c], size=k, replace=False))
    return sorted(out)


class Timed:
    """Wall and process CPU seconds of an LM's ``loglikelihood`` calls (instance attribute, so
    lm-eval's evaluator calls it)."""

    def __init__(self, lm):
        self.wall = self.cpu = 0.0
        inner = lm.loglikelihood

        def timed(requests, *a, **kw):
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(requests, *a, **kw)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c
        lm.loglikelihood = timed


def run(name: str, make_lm, tm, idx: list, cache: str = "") -> dict:
    """One backend on the items; with ``cache`` a finished run is kept in (and read back from)
    that JSON file, so an interrupted benchmark redoes only the backend it lost."""
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            got = json.load(f)
        if got["doc_ids"] == idx:
            log(f"--- {name}: read from {cache} (timings of the run that wrote it)")
            return dict(got, lls=np.array(got["lls"]))
    log(f"--- {name}: {len(idx)} items ({load_avg()})")
    lm = make_lm()
    timer = Timed(lm)
    w, c = time.perf_counter(), time.process_time()
    res = lm_eval.simple_evaluate(model=lm, tasks=["bbq"], task_manager=tm,
                                  samples={"bbq": idx}, log_samples=True)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    samples = sorted(res["samples"]["bbq"], key=lambda s: s["doc_id"])
    lls = np.array([[float(r[0]) for r in s["filtered_resps"]] for s in samples])
    log(f"{name}: model {timer.wall:.1f} s wall / {timer.cpu:.1f} s CPU; simple_evaluate "
        f"{wall:.1f} s wall / {cpu:.1f} s CPU ({load_avg()})")
    out = {"lls": lls, "doc_ids": [s["doc_id"] for s in samples],
           "results": {k: float(res["results"]["bbq"][f"{k},none"]) for k in METRICS},
           "model_wall": timer.wall, "model_cpu": timer.cpu, "wall": wall, "cpu": cpu}
    if cache:
        atomic_write_json(cache, dict(out, lls=lls.tolist()))
    return out


def own_format(handle, docs, batch_size: int) -> dict:
    """The project's own log-likelihood mode with ``loglik.format=lm_eval`` (no lm-eval in the
    loop) on the same items: its 12 log-likelihoods per item, in the docs' order."""
    cats = list(dict.fromkeys(d["category"] for d in docs))
    every = bbq_data.load_bbq(bbq_data.default_bbq_dir(), cats)
    by_key = {(it.category, it.example_id): it for c in cats for it in every[c]}
    by_cat: dict = {}
    for d in docs:
        it = by_key[(d["category"], int(d["example_id"]))]
        by_cat.setdefault(it.category, []).append(it)
    cfg = eval_config.base_config()
    cfg.loglik.format, cfg.runtime.batch_size = "lm_eval", batch_size
    cfg.report.bootstrap_resamples = 0
    log(f"--- own lm_eval format: {len(docs)} items ({load_avg()})")
    w = time.perf_counter()
    rep = tasks.evaluate_model(handle, by_cat, cfg)
    wall = time.perf_counter() - w
    rows = {(r["category"], r["example_id"]): r["option_logprob_sum"] for r in rep["items"]}
    lls = np.array([rows[(d["category"], int(d["example_id"]))] for d in docs])
    log(f"own lm_eval format: {wall:.1f} s wall ({load_avg()})")
    return {"lls": lls, "wall": wall,
            "metrics": {m: float(rep["lm_eval"]["metrics"][m]) for m in METRICS}}


def metrics(task, docs, lls: np.ndarray) -> dict:
    """The task's metrics from per-item log-likelihoods (its own process_results and
    aggregations, exactly what simple_evaluate computes)."""
    per = [task.process_results(docs[i], [(float(x), False) for x in row])
           for i, row in enumerate(lls)]
    agg = task.aggregation()
    return {m: float(agg[m]([p[m] for p in per])) for m in METRICS}


def table(rows: dict) -> str:
    names = list(rows)
    lines = [f"{'metric':<18}" + "".join(f"{n:>22}" for n in names)]
    for m in METRICS:
        lines.append(f"{m:<18}" + "".join(f"{rows[n][m]:>22.6f}" for n in names))
    return "\n".join(lines)


def compare(hf: dict, ours: dict, tie: float) -> dict:
    """Agreement, the largest difference and the disagreements (with HF's top-2 gap)."""
    if hf["doc_ids"] != ours["doc_ids"]:
        raise SystemExit("the two runs scored different items")
    a, b = hf["lls"], ours["lls"]
    choice_hf, choice_ours = a.argmax(1), b.argmax(1)
    top2 = np.sort(a, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    dis = np.nonzero(choice_hf != choice_ours)[0]
    return {"agree": float(np.mean(choice_hf == choice_ours)),
            "max_diff": float(np.abs(a - b).max()),
            "disagree": [(int(i), int(choice_hf[i]), int(choice_ours[i]), float(gap[i]))
                         for i in dis],
            "ties_only": bool(all(gap[i] < tie for i in dis)), "choice_hf": choice_hf}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=300, help="BBQ items (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="item draw seed (default: %(default)s)")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="regift_jax model (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="batch size of both backends (default: %(default)s)")
    p.add_argument("--tie", type=float, default=1e-3,
                   help="near-tie threshold on HF's top-2 gap (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the figures and per-item scores here")
    p.add_argument("--cache_dir", default=None,
                   help="keep each backend's finished run here and reuse it on a rerun with the "
                        "same items (default: none)")
    p.add_argument("--own_format", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the items with the project's own loglik.format=lm_eval")
    return p.parse_args(argv)


def report(args, task, docs, hf, ours, cmp, own=None) -> None:
    log(f"\n=== lm-eval bbq, {args.items} items (seed {args.seed}), {args.model} ===")
    cats = {}
    for d in docs:
        cats[d["category"]] = cats.get(d["category"], 0) + 1
    log("items per category: " + ", ".join(f"{k} {v}" for k, v in cats.items()))
    log(f"largest log-likelihood difference (item x choice): {cmp['max_diff']:.3g}")
    log(f"disagreements: {len(cmp['disagree'])}" + "".join(
        f"\n  doc {hf['doc_ids'][i]}: hf choice {h}, regift_jax choice {o}, hf top-2 gap {g:.3g}"
        for i, h, o, g in cmp["disagree"]))
    m_hf, m_ours = metrics(task, docs, hf["lls"]), metrics(task, docs, ours["lls"])
    for name, run_, m in (("hf", hf, m_hf), ("regift_jax", ours, m_ours)):
        got = run_["results"]
        if not np.allclose([got[k] for k in METRICS], [m[k] for k in METRICS], equal_nan=True):
            raise SystemExit(f"{name}: recomputed metrics {m} differ from lm-eval's {got}")
    tied = ours["lls"].copy()
    for i, h, _, g in cmp["disagree"]:
        if g < args.tie:  # give the near tie HF's choice
            tied[i, h] = tied[i].max() + 1.0
    m_tied = metrics(task, docs, tied)
    log("\n" + table({"hf": m_hf, "regift_jax": m_ours, "regift_jax (ties=hf)": m_tied}))
    worst = max(abs(m_hf[k] - m_tied[k]) for k in METRICS)
    log(f"largest metric difference after near ties: {worst:.3g}")
    log(f"\nspeed (model calls, JAX compilation included): hf {hf['model_wall']:.1f} s, "
        f"regift_jax {ours['model_wall']:.1f} s wall -> ratio "
        f"{hf['model_wall'] / ours['model_wall']:.2f}x; CPU s ratio "
        f"{hf['model_cpu'] / ours['model_cpu']:.2f}x")
    log(f"speed (whole simple_evaluate): hf {hf['wall']:.1f} s, regift_jax {ours['wall']:.1f} s "
        f"-> ratio {hf['wall'] / ours['wall']:.2f}x")
    if own is not None:
        same = own["lls"].argmax(1) == ours["lls"].argmax(1)
        log(f"\nown lm_eval format (python -m regift_jax.evaluate --config=configs/eval.py:lm_eval)"
            f": per-item choice equal to the regift_jax backend's on {int(same.sum())} of "
            f"{len(same)} items, largest log-likelihood difference "
            f"{np.abs(own['lls'] - ours['lls']).max():.3g}; its lm-eval metrics vs the task's: "
            f"largest difference {max(abs(own['metrics'][k] - m_ours[k]) for k in METRICS):.3g}")
    if args.json:
        out = {k: v for k, v in vars(args).items()}
        out.update(agreement=cmp["agree"], max_diff=cmp["max_diff"],
                   disagreements=cmp["disagree"], metrics={"hf": m_hf, "regift_jax": m_ours,
                                                           "regift_jax_ties_hf": m_tied},
                   doc_ids=hf["doc_ids"], lls_hf=hf["lls"].tolist(),
                   lls_regift_jax=ours["lls"].tolist(),
                   speed={n: {k: r[k] for k in ("model_wall", "model_cpu", "wall", "cpu")}
                          for n, r in (("hf", hf), ("regift_jax", ours))})
        if own is not None:
            out.update(own_format={"metrics": own["metrics"], "wall": own["wall"],
                                   "lls": own["lls"].tolist()})
        atomic_write_json(args.json, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    tm = harness.task_manager()
    task = tm.load(["bbq"])["tasks"]["bbq"]
    all_docs = task.test_docs()
    idx = draw_items(all_docs, args.items, args.seed)
    docs = [all_docs[i] for i in idx]
    handle = models.load(args.model)
    key = f"{os.path.basename(args.model)}_n{args.items}_s{args.seed}_b{args.batch_size}"
    cache = {n: os.path.join(args.cache_dir, f"{n}_{key}.json") if args.cache_dir else ""
             for n in ("hf", "regift_jax")}
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as export_dir:
        handle.export(export_dir)
        hf = run("hf", lambda: HFLM(pretrained=export_dir, device="cpu", dtype="float32",
                                    batch_size=args.batch_size), tm, idx, cache["hf"])
    ours = run("regift_jax", lambda: harness.RegiftLM(model=args.model, handle=handle,
                                                      batch_size=args.batch_size),
               tm, idx, cache["regift_jax"])
    own = own_format(handle, docs, args.batch_size) if args.own_format else None
    cmp = compare(hf, ours, args.tie)
    report(args, task, docs, hf, ours, cmp, own)
    log(f"per-item agreement: {100 * cmp['agree']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
