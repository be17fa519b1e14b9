"""The whole ReGiFT experiment in one run: evaluate the base student on BBQ, fine-tune it on the
teacher traces, evaluate the tuned student the same way, and write a before/after report.

Called by ``python -m regift_jax.train`` when ``config.experiment.enabled`` (the default preset of
``configs/llama.py`` enables it).  Every evaluation runs in this process:
:func:`eval_config` builds one evaluation config per mode from ``config.experiment``
(:func:`regift_jax.eval.config.base_config` plus the mode's prompt, subset and batch size) and
:func:`regift_jax.eval.evaluate.run` returns the report dict.  Both models get the same config
but for the model and the output directory, so the two reports are computed by identical code
on identical items:

1. ``eval_before/<mode>``: the base model (``config.model.name``);
2. training (``train_fn``, e.g. :func:`regift_jax.train.run_training`), which exports the merged
   student;
3. ``eval_after/<mode>``: the exported student, compared with the report of step 1, which writes
   ``comparison.md`` / ``comparison.png``;
4. ``experiment.md`` / ``experiment.json`` in the work directory: the headline numbers of every
   mode before and after with the paired test's p-value of each change (the paired cluster
   bootstrap of :mod:`regift_jax.eval.compare`), the generations cut off by the token budget,
   the training summary, the stage timings, and a plain verdict: it says when the tuned student
   is *not* better, reads each bias score in its signed direction (BBQ: s > 0 leans towards the
   stereotype) as well as in magnitude, and says "inside the noise" for every change whose
   paired p-value is >= 0.05.

Every evaluation shows the prompts in the format the student is trained on
(``experiment.chat="train"``: chat-wrapped exactly when ``data.chat_template``; see
:func:`regift_jax.core.configs_util.eval_chat`), with the tokenizer's BOS as in training.  The
training checks (:func:`regift_jax.training.loop.preflight`) run before any model work, and a
work directory that already holds this finished run and its ``experiment.json`` gives the stored
results without evaluating or training again.

Under ``jax.distributed`` (a multi-host training run) every process evaluates its share of the
items; process 0 writes the reports.

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

import ml_collections

from regift_jax.core import configs_util
from regift_jax.core.io import atomic_write_json, atomic_write_text
from regift_jax.eval import config as eval_config_lib
from regift_jax.eval import evaluate as eval_lib
from regift_jax.eval import hosts
from regift_jax.eval.report import to_jsonable
from regift_jax.training import loop

HEADLINE = ("acc_overall", "acc_ambig", "acc_disambig", "paper_acc_overall", "s_dis", "s_amb",
            "unparseable_rate_overall")
MODES = ("loglik", "generate")
COMPARE_LABELS = "base,ReGiFT"
#: A paired test's p-value at or above this is "inside the noise".
ALPHA = 0.05


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

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        self.start(name)
        out = fn()
        self.end(name)
        return out


def eval_config(ecfg, mode: str, model: str, out: str, compare: bool = False,
                chat: str = "auto") -> ml_collections.ConfigDict:
    """The evaluation config of one mode of ``config.experiment`` (``ecfg``) for ``model``;
    ``chat``: the prompt's chat wrapping (auto | on | off), from
    :func:`regift_jax.core.configs_util.eval_chat` of the whole config."""
    m = ecfg[mode]
    c = eval_config_lib.base_config()
    c.mode, c.model, c.out = mode, model, out
    c.prompt.template = m.prompt
    c.prompt.chat = chat
    c.data.categories = ecfg.categories
    c.data.max_items_per_category = int(m.max_items_per_category)
    c.data.subset_seed = int(ecfg.subset_seed)
    c.runtime.batch_size = int(m.batch_size)
    c.report.bootstrap_resamples = int(ecfg.bootstrap_resamples)
    if mode == "generate" and m.max_new_tokens:
        c.generate.max_new_tokens = int(m.max_new_tokens)
    if compare:
        c.report.compare_labels = COMPARE_LABELS
    c.report.title = f"BBQ ({mode}, {m.prompt}) — {os.path.basename(model.rstrip('/'))}"
    return c


def _evaluate(cfg, compare_with: Optional[dict] = None) -> dict:
    """One in-process evaluation; the report as report.json holds it (strict JSON values)."""
    rep = eval_lib.run(cfg, compare_with=compare_with)
    if hosts.is_writer():
        eval_lib.print_summary(rep)
    return to_jsonable(rep)


def _headline(rep: dict) -> dict:
    tot = rep["metrics"]["total"]
    return {k: tot.get(k) for k in HEADLINE}


def _f(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _noise(test: Optional[dict]) -> str:
    """`` (p = 0.41, inside the noise)`` from a paired test row, or nothing without one."""
    p = None if not test else test.get("p_value")
    if p is None or p != p:
        return ""
    return f" (p = {p:.2f}{', inside the noise' if p >= ALPHA else ''})"


def _accuracy_sentence(a0, a1, test) -> str:
    if a1 > a0:
        return f"accuracy rose from {_f(a0)}% to {_f(a1)}%{_noise(test)}"
    if a1 < a0:
        return (f"accuracy FELL from {_f(a0)}% to {_f(a1)}%: the tuned student is not better "
                f"on this measure{_noise(test)}")
    return f"accuracy unchanged at {_f(a0)}%"


def _bias_sentence(name: str, label: str, b0: float, b1: float, test) -> str:
    """A bias score's change in its signed direction (BBQ: s > 0 leans towards the stereotype,
    s < 0 away from it) and in magnitude (|s|: distance from unbiased), both said."""
    if b1 == b0:
        return f"{label} unchanged at {_signed(b0)}"
    way = ("towards the stereotype" if b1 > b0 else
           "away from the stereotype (towards the anti-stereotype)")
    cross = ""
    if b0 * b1 < 0:
        cross = (" (crossing zero to the stereotypical side)" if b1 > 0 else
                 " (crossing zero to the anti-stereotypical side)")
    if abs(b1) < abs(b0):
        size = f"|{name}| fell from {_f(abs(b0))} to {_f(abs(b1))}, closer to unbiased"
    elif abs(b1) > abs(b0):
        size = f"|{name}| ROSE from {_f(abs(b0))} to {_f(abs(b1))}, further from unbiased"
    else:
        size = f"|{name}| unchanged at {_f(abs(b0))}"
    return (f"{label} moved {way}, from {_signed(b0)} to {_signed(b1)}{cross}; {size}"
            f"{_noise(test)}")


def verdict(before: dict, after: dict, paired: Optional[dict] = None) -> str:
    """Plain-language comparison of two headline dicts (fractions); ``paired``: the paired
    test of each headline metric (``{metric: {"diff", "p_value", ...}}``), whose p-value is
    printed beside each change and decides "inside the noise" (p >= 0.05)."""
    paired = paired or {}
    parts = []
    a0, a1 = before.get("acc_overall"), after.get("acc_overall")
    if a0 is not None and a1 is not None:
        parts.append(_accuracy_sentence(a0, a1, paired.get("acc_overall")))
    for k, name, label in (("s_amb", "s_AMB", "the ambiguous-context bias s_AMB"),
                           ("s_dis", "s_DIS", "the disambiguated-context bias s_DIS")):
        b0, b1 = before.get(k), after.get(k)
        if b0 is not None and b1 is not None:
            parts.append(_bias_sentence(name, label, b0, b1, paired.get(k)))
    tested = [paired[k]["p_value"] for k in ("acc_overall", "s_amb", "s_dis")
              if k in paired and paired[k].get("p_value") is not None]
    if tested and all(p >= ALPHA for p in tested):
        parts.append("every change above is inside the noise (paired cluster "
                     f"bootstrap, p >= {ALPHA:.2f})")
    return "; ".join(parts) + "."


def _table_rows(b: dict, a: dict, paired: dict) -> List[str]:
    fmt = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
    rows = []
    for k in HEADLINE:
        if b.get(k) is None and a.get(k) is None:
            continue
        d = (a[k] - b[k]) if (a.get(k) is not None and b.get(k) is not None) else None
        p = (paired.get(k) or {}).get("p_value")
        rows.append(f"| {k} | {fmt(b.get(k))} | {fmt(a.get(k))} | "
                    f"{'—' if d is None else f'{100 * d:+.2f}'} | "
                    f"{'—' if p is None else f'{p:.2f}'} |")
    return rows


def write_summary(workdir: str, results: dict) -> str:
    lines = ["# ReGiFT experiment: before / after", "",
             f"Student: `{results['model']}`; traces: `{results['traces']}`.", ""]
    for mode, r in results["modes"].items():
        b, a = r["before"], r["after"]
        lines += [f"## BBQ, {mode} mode (`{r['prompt']}` prompt, {r['n_items']} items)", "",
                  "| metric | base | ReGiFT | change | p (paired) |", "|---|---:|---:|---:|---:|"]
        lines += _table_rows(b, a, r.get("paired") or {})
        if r.get("cut_off"):
            c0, c1 = r["cut_off"]
            lines += ["", f"Cut off by the token budget: base {c0}, ReGiFT {c1} of "
                          f"{r['n_items']} generations."]
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
              "`paper_acc_overall` is the authors' static exact match, applied to the generated "
              "answer in generate mode and to the chosen option's text in loglik mode; "
              "s_DIS / s_AMB are the BBQ bias scores of Parrish et al. (2022) with the biased "
              "option derived from BBQ metadata (an approximation, see "
              "`regift_jax/data/bbq.py`): s > 0 leans towards the stereotype, s < 0 away from "
              "it, |s| is the distance from unbiased. Values are fractions x 100. p: the paired "
              "cluster bootstrap of the change (BBQ context groups resampled jointly for both "
              "models); p >= 0.05 is inside the noise. Small subsets have wide intervals (see "
              "each report.json's bootstrap and comparison)."]
    path = os.path.join(workdir, "experiment.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _modes(ecfg) -> List[str]:
    modes = [m for m in ecfg.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"experiment.modes: unknown mode {m!r}; valid: {', '.join(MODES)}")
    return modes


def _mode_result(ecfg, mode: str, before: dict, after: dict) -> dict:
    hb, ha = _headline(before), _headline(after)
    comparison = after.get("comparison") or {}
    paired = {k: {f: t.get(f) for f in ("diff", "ci", "p_value")}
              for k, t in comparison.get("metrics", {}).get("total", {}).items()}
    out = {"prompt": ecfg[mode].prompt, "before": hb, "after": ha,
           "n_items": after["metrics"]["total"].get("n_total"), "paired": paired,
           "mcnemar": comparison.get("mcnemar", {}).get("total"),
           "verdict": verdict(hb, ha, paired),
           "comparison_png": after["files"].get("comparison_plot")}
    if after.get("cut_off"):
        out["cut_off"] = [before["cut_off"]["n_cut_off"], after["cut_off"]["n_cut_off"]]
    return out


def _already_done(config, workdir: str) -> Optional[dict]:
    """The stored results (``experiment.json`` with ``train_result``) when ``workdir`` holds
    this finished run and its experiment report, else None (the run goes ahead)."""
    train_res = loop.finished_run(config, workdir)
    path = os.path.join(workdir, "experiment.json")
    if train_res is None or not os.path.isfile(path):
        return None
    print(f"[experiment] already done: {os.path.join(workdir, 'experiment.md')} holds the "
          "report of this finished run; nothing evaluated or trained", flush=True)
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    results["train_result"] = train_res
    return results


def run_experiment(config, workdir: str, train_fn: Callable[..., dict]) -> dict:
    """Evaluate before, train (``train_fn(config, workdir) -> dict`` with ``export_dir``),
    evaluate after, report.  Returns the results dict (also written to experiment.json) with
    the training result under ``train_result``."""
    ecfg = config.experiment
    modes = _modes(ecfg)
    chat = configs_util.eval_chat(config)
    workdir = loop.preflight(config, workdir)  # one-line errors before any model work
    done = _already_done(config, workdir)
    if done is not None:
        return done
    st = _Stages([(f"evaluate base student ({m})", ecfg[m].est_seconds) for m in modes] +
                 [("ReGiFT fine-tuning", ecfg.train_est_seconds)] +
                 [(f"evaluate tuned student ({m})", ecfg[m].est_seconds) for m in modes])
    t0 = time.time()
    base = config.model.name
    before = {m: st.run(f"evaluate base student ({m})", lambda m=m: _evaluate(
        eval_config(ecfg, m, base, os.path.join(workdir, "eval_before", m), chat=chat)))
        for m in modes}
    train_res = st.run("ReGiFT fine-tuning", lambda: train_fn(config, workdir))
    export_dir = train_res.get("export_dir")
    if not export_dir or not os.path.isdir(export_dir):
        raise RuntimeError("training did not export a model (config.export.enabled?); cannot "
                           "evaluate the tuned student")
    traces = f"{config.data.source} ({config.data.selection}, {config.data.criterion})"
    results = {"model": base, "traces": traces, "modes": {},
               "training": {k: v for k, v in train_res.items()
                            if isinstance(v, (int, float, str)) or k in ("train", "eval")}}
    for m in modes:
        after = st.run(f"evaluate tuned student ({m})", lambda m=m: _evaluate(
            eval_config(ecfg, m, export_dir, os.path.join(workdir, "eval_after", m),
                        compare=True, chat=chat), compare_with=before[m]))
        results["modes"][m] = _mode_result(ecfg, m, before[m], after)
    results["stage_seconds"] = st.done
    results["wall_time_s"] = time.time() - t0
    if hosts.is_writer():
        atomic_write_json(os.path.join(workdir, "experiment.json"), results)
        path = write_summary(workdir, results)
        with open(path, encoding="utf-8") as f:
            print(f.read())
        print(f"[experiment] report: {path}  (wall time {results['wall_time_s'] / 60:.1f} min)")
    results["train_result"] = train_res
    return results
