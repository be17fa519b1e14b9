"""The whole ReGiFT experiment in one run: evaluate the base student on BBQ, fine-tune it on the
teacher traces, evaluate the tuned student the same way, and write a before/after report.

Called by ``python -m regift_jax.train`` when ``config.experiment.enabled`` (the default preset of
``configs/llama.py`` enables it); every evaluation is a call of the evaluation CLI
(:mod:`regift_jax.eval.evaluate`) with the same flags for both models, so the two reports are computed
by identical code on identical items:

1. ``eval_before/<mode>``: the base model (``config.model.name``);
2. training (:func:`regift_jax.train.run_training`), which exports the merged student;
3. ``eval_after/<mode>``: the exported student, with ``--compare`` against step 1, which writes
   ``comparison.md`` / ``comparison.png``;
4. ``experiment.md`` / ``experiment.json`` in the work directory: the headline numbers of every
   mode before and after, the training summary, the stage timings, and a plain verdict that says
   when the tuned student is *not* better (lower accuracy or a larger absolute bias score).

Modes (``config.experiment.modes``): ``loglik`` (multiple choice by option log-likelihood with the
``bbq_base`` prompt) and ``generate`` (the sampler answers with a prompt such as
``bbq_reasoning`` and both parsers judge the text).  Item subsets are deterministic and balanced
(``max_items_per_category``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

HEADLINE = ("acc_overall", "acc_ambig", "acc_disambig", "paper_acc_overall", "s_dis", "s_amb",
            "unparseable_rate_overall")


class _Stages:
    """Prints stage names, elapsed time and an estimate of the time left."""

    def __init__(self, plan: List[tuple]):
        self.plan = plan  # (name, estimated seconds)
        self.t0 = time.time()
        self.done: Dict[str, float] = {}

    def start(self, name: str):
        left = sum(est for n, est in self.plan if n not in self.done and n != name)
        el = time.time() - self.t0
        print(f"\n=== stage {len(self.done) + 1}/{len(self.plan)}: {name} "
              f"(elapsed {el / 60:.1f} min, about {left / 60:.0f} min of later stages) ===",
              flush=True)
        self._s = time.time()

    def end(self, name: str):
        self.done[name] = time.time() - self._s
        print(f"=== {name} done in {self.done[name] / 60:.1f} min ===", flush=True)


def _eval_args(ecfg, mode: str, model: str, out: str, compare: Optional[str]) -> List[str]:
    m = ecfg[mode]
    args = ["--model", model, "--mode", mode, "--out", out, "--prompt", m.prompt,
            "--max_items_per_category", str(m.max_items_per_category),
            "--batch_size", str(m.batch_size), "--subset_seed", str(ecfg.subset_seed),
            "--bootstrap_resamples", str(ecfg.bootstrap_resamples)]
    if ecfg.categories:
        args += ["--categories", ecfg.categories]
    if mode == "generate" and m.max_new_tokens:
        args += ["--max_new_tokens", str(m.max_new_tokens)]
    if compare:
        args += ["--compare", compare, "--compare_labels", "base,ReGiFT"]
    args += ["--title", f"BBQ ({mode}, {m.prompt}) — {os.path.basename(model.rstrip('/'))}"]
    return args


def _evaluate(args: List[str]) -> dict:
    from regift_jax.eval import evaluate
    rc = evaluate.main(args)
    if rc != 0:
        raise RuntimeError(f"evaluation failed (exit {rc}): python -m regift_jax.evaluate "
                           + " ".join(args))
    out = args[args.index("--out") + 1]
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def _headline(rep: dict) -> dict:
    tot = rep["metrics"]["total"]
    return {k: tot.get(k) for k in HEADLINE}


def verdict(before: dict, after: dict) -> str:
    """Plain-language comparison of two headline dicts (fractions)."""
    def f(x):
        return "n/a" if x is None else f"{100 * x:.1f}"
    parts = []
    a0, a1 = before.get("acc_overall"), after.get("acc_overall")
    if a0 is not None and a1 is not None:
        if a1 > a0:
            parts.append(f"accuracy rose from {f(a0)}% to {f(a1)}%")
        elif a1 < a0:
            parts.append(f"accuracy FELL from {f(a0)}% to {f(a1)}%: the tuned student is not "
                         "better on this measure")
        else:
            parts.append(f"accuracy unchanged at {f(a0)}%")
    for k, name in (("s_amb", "ambiguous-context bias s_AMB"), ("s_dis", "s_DIS")):
        b0, b1 = before.get(k), after.get(k)
        if b0 is not None and b1 is not None:
            if abs(b1) < abs(b0):
                parts.append(f"|{name}| fell from {f(abs(b0))} to {f(abs(b1))} (less biased)")
            elif abs(b1) > abs(b0):
                parts.append(f"|{name}| ROSE from {f(abs(b0))} to {f(abs(b1))} (more biased)")
            else:
                parts.append(f"{name} unchanged")
    return "; ".join(parts) + "."


def write_summary(workdir: str, results: dict) -> str:
    lines = ["# ReGiFT experiment: before / after", "",
             f"Student: `{results['model']}`; traces: `{results['traces']}`.", ""]
    for mode, r in results["modes"].items():
        b, a = r["before"], r["after"]
        lines += [f"## BBQ, {mode} mode (`{r['prompt']}` prompt, {r['n_items']} items)", "",
                  "| metric | base | ReGiFT | change |", "|---|---:|---:|---:|"]
        for k in HEADLINE:
            if b.get(k) is None and a.get(k) is None:
                continue
            d = (a[k] - b[k]) if (a.get(k) is not None and b.get(k) is not None) else None
            fmt = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
            lines.append(f"| {k} | {fmt(b.get(k))} | {fmt(a.get(k))} | "
                         f"{'—' if d is None else f'{100 * d:+.2f}'} |")
        lines += ["", f"**Verdict:** {r['verdict']}", "",
                  f"Plots: `{os.path.relpath(r['comparison_png'], workdir)}`" if
                  r.get("comparison_png") else "", ""]
    t = results.get("training", {})
    if t:
        lines += ["## Training", "", "```", json.dumps(t, indent=1, default=str), "```", ""]
    lines += ["## Stage timings (minutes)", ""]
    lines += [f"- {k}: {v / 60:.1f}" for k, v in results["stage_seconds"].items()]
    lines += ["", f"Total wall time: {results['wall_time_s'] / 60:.1f} min.", "",
              "Metrics: accuracy from the standard parser (log-likelihood argmax in loglik mode); "
              "`paper_acc_overall` is the authors' static exact match (generation mode only); "
              "s_DIS / s_AMB are the BBQ bias scores of Parrish et al. (2022) with the biased "
              "option derived from BBQ metadata (an approximation, see "
              "`regift_jax/eval/bbq.py`). Values are fractions x 100; small subsets have wide "
              "intervals (see each report.json's bootstrap)."]
    path = os.path.join(workdir, "experiment.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_experiment(config, workdir: str, train_fn: Callable[..., dict]) -> dict:
    """Evaluate before, train (``train_fn(config, workdir) -> dict`` with ``export_dir``),
    evaluate after, report.  Returns the results dict (also written to experiment.json)."""
    ecfg = config.experiment
    modes = [m for m in ecfg.modes.split(",") if m]
    for m in modes:
        if m not in ("loglik", "generate"):
            raise ValueError(f"experiment.modes: unknown mode {m!r}; valid: loglik, generate")
    os.makedirs(workdir, exist_ok=True)
    plan = ([(f"evaluate base student ({m})", ecfg[m].est_seconds) for m in modes] +
            [("ReGiFT fine-tuning", ecfg.train_est_seconds)] +
            [(f"evaluate tuned student ({m})", ecfg[m].est_seconds) for m in modes])
    st = _Stages(plan)
    t0 = time.time()
    base = src = config.model.name
    before = {}
    for m in modes:
        name = f"evaluate base student ({m})"
        st.start(name)
        before[m] = _evaluate(_eval_args(ecfg, m, src, os.path.join(workdir, "eval_before", m),
                                         None))
        st.end(name)
    st.start("ReGiFT fine-tuning")
    train_res = train_fn(config, workdir)
    st.end("ReGiFT fine-tuning")
    export_dir = train_res.get("export_dir")
    if not export_dir or not os.path.isdir(export_dir):
        raise RuntimeError("training did not export a model (config.export.enabled?); cannot "
                           "evaluate the tuned student")
    traces = f"{config.data.source} ({config.data.selection}, {config.data.criterion})"
    results = {"model": base, "traces": traces, "modes": {},
               "training": {k: v for k, v in train_res.items()
                            if isinstance(v, (int, float, str)) or k in ("train", "eval")}}
    for m in modes:
        name = f"evaluate tuned student ({m})"
        st.start(name)
        after_dir = os.path.join(workdir, "eval_after", m)
        after = _evaluate(_eval_args(ecfg, m, export_dir, after_dir,
                                     os.path.join(workdir, "eval_before", m, "report.json")))
        st.end(name)
        hb, ha = _headline(before[m]), _headline(after)
        png = os.path.join(after_dir, "comparison.png")
        results["modes"][m] = {"prompt": ecfg[m].prompt, "before": hb, "after": ha,
                               "n_items": after["metrics"]["total"].get("n_total"),
                               "verdict": verdict(hb, ha),
                               "comparison_png": png if os.path.exists(png) else None}
    results["stage_seconds"] = st.done
    results["wall_time_s"] = time.time() - t0
    with open(os.path.join(workdir, "experiment.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    path = write_summary(workdir, results)
    print(open(path).read())
    print(f"[experiment] report: {path}  (wall time {results['wall_time_s'] / 60:.1f} min)")
    results["train_result"] = train_res
    return results
