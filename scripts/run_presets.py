"""Run a list of config presets one after another and assemble one comparison table.

    python scripts/run_presets.py --presets=correct,incorrect,all
    python scripts/run_presets.py --presets=frac20,frac40,frac60,frac80,frac100 \\
        --extra=--config.train.num_epochs=2
    python scripts/run_presets.py --presets=correct,cot,instruction --dry_run
    python scripts/run_presets.py --table_only            # every preset that has a result

For each preset ``P`` this runs, in the repository root, ::

    python -m regift_jax.train --config=<config_file>:P --workdir=<runs_dir>/P [extra ...]

(``config_file`` default ``configs/ablations.py``, ``runs_dir`` default ``runs/ablations``;
relative paths are relative to the repository root), streaming its output to the terminal and to
``<runs_dir>/P/run_presets.log``.  A preset whose ``<runs_dir>/P/experiment.json`` exists is
skipped, so an interrupted batch resumes where it stopped (an interrupted training run itself
resumes from its last checkpoint).  A failing preset does not stop the batch; the exit status is
1 when any failed.

Then (and with ``--table_only`` only this) it reads every ``experiment.json``
(``regift_jax.experiment``: ``modes.<mode>.before/after`` headline metrics and ``training``) and
writes ``<runs_dir>/comparison.md`` and ``comparison.json``:

* *Base model (no training)*: the ``before`` numbers, one row per (mode, prompt); every run
  evaluates the same base model on the same items, so runs sharing a (mode, prompt) must agree,
  and a disagreement is printed under the table;
* *Paper Table 3*: Base, CoT prompting (``cot``'s before), Instruction (``instruction``'s after),
  ReGiFT (``correct``'s after), for the presets present;
* *All runs*: one row per preset x mode, each metric as ``before -> after``, with the training
  steps and the last logged training / held-out loss.

Metrics are :data:`regift_jax.experiment.HEADLINE` in percent (fractions x 100).  Training
overrides go through ``--extra`` (repeatable; each is split like a shell command line).  For
presets whose ``data.max_examples`` is counted from the trace set when the config is built (the
config module's ``COUNTED``), overriding a key the count depends on (``COUNT_KEYS``) is refused:
pass the trace set with ``--source`` (the presets' ``source=`` argument) instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from regift_jax.core import configs_util  # noqa: E402
from regift_jax.experiment import HEADLINE  # noqa: E402

RESULT = "experiment.json"
ARROW = "→"
TABLE3 = (  # (method, preset (None: the base model), which side of its experiment.json)
    ("Base", None, "before"),
    ("CoT prompting", "cot", "before"),
    ("Instruction", "instruction", "after"),
    ("ReGiFT", "correct", "after"),
)


class ResultError(ValueError):
    """An experiment.json that cannot be used; the message names the file."""


# ============================================================================ running
def _abs(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def preset_command(python: str, config_file: str, preset: str, runs_dir: str,
                   extra: Sequence[str] = (), source: str = "") -> List[str]:
    arg = f"preset={preset},source={source}" if source else preset
    return [python, "-m", "regift_jax.train", f"--config={config_file}:{arg}",
            f"--workdir={os.path.join(runs_dir, preset)}", *extra]


def check_extra(extra: Sequence[str], presets: Sequence[str], module) -> None:
    """Refuse overrides that would break the runner or a counted preset (ValueError)."""
    for a in extra:
        if a.split("=", 1)[0] in ("--workdir", "-workdir"):
            raise ValueError("--extra must not set --workdir: every preset runs in "
                             "<runs_dir>/<preset>; use --runs_dir")
    keys = configs_util.override_keys(list(extra))
    counted = [p for p in presets if p in getattr(module, "COUNTED", ())]
    bad = [k for k in keys if k in getattr(module, "COUNT_KEYS", ())]
    if counted and bad:
        raise ValueError(f"--extra overrides {', '.join(bad)}, but presets {', '.join(counted)} "
                         "set data.max_examples from a count of the trace set made when the "
                         "config is built; the override would make it stale (use --source, or "
                         "run these presets separately)")


def run_one(cmd: List[str], log_path: str) -> int:
    """Run ``cmd`` in the repository root; stream its output to stdout and ``log_path``."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                errors="replace")
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        rc = proc.wait()
        log.write(f"[run_presets] exit status {rc}\n")
    return rc


# ============================================================================ the table
def _pct(v) -> Optional[float]:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    return 100.0 * float(v)


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def load_result(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            exp = json.load(f)
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(exp, dict) or not isinstance(exp.get("modes"), dict) or not exp["modes"]:
        raise ResultError(f"{path}: no 'modes' object (not an experiment.json of "
                          "regift_jax.experiment?)")
    for mode, r in exp["modes"].items():
        for side in ("before", "after"):
            if not isinstance(r, dict) or not isinstance(r.get(side), dict):
                raise ResultError(f"{path}: modes.{mode}.{side} missing or not an object")
    return exp


def rows_of(preset: str, exp: dict) -> List[dict]:
    tr = exp.get("training") or {}
    train, ev = tr.get("train") or {}, tr.get("eval") or {}
    rows = []
    for mode, r in exp["modes"].items():
        rows.append({
            "preset": preset, "mode": mode, "prompt": r.get("prompt"),
            "n_items": r.get("n_items"),
            "steps": tr.get("step"), "total_steps": tr.get("total_steps"),
            "train_loss": train.get("loss"), "eval_loss": ev.get("loss"),
            "before": {k: _pct(r["before"].get(k)) for k in HEADLINE},
            "after": {k: _pct(r["after"].get(k)) for k in HEADLINE},
        })
    return rows


def base_rows(rows: List[dict]) -> tuple:
    """One row per (mode, prompt, n_items) from the ``before`` numbers, and the disagreements."""
    groups: Dict[tuple, dict] = {}
    notes = []
    for r in rows:
        key = (r["mode"], r["prompt"], r["n_items"])
        g = groups.get(key)
        if g is None:
            groups[key] = {"mode": r["mode"], "prompt": r["prompt"], "n_items": r["n_items"],
                           "metrics": dict(r["before"]), "runs": [r["preset"]]}
            continue
        g["runs"].append(r["preset"])
        diff = [k for k in HEADLINE
                if (g["metrics"][k] is None) != (r["before"][k] is None) or
                (g["metrics"][k] is not None and abs(g["metrics"][k] - r["before"][k]) > 1e-6)]
        if diff:
            notes.append(f"base model ({r['mode']}, {r['prompt']}): run {r['preset']!r} "
                         f"disagrees with {g['runs'][0]!r} on {', '.join(diff)}")
    return list(groups.values()), notes


def table3_rows(rows: List[dict]) -> List[dict]:
    by = {}
    for r in rows:
        by.setdefault(r["preset"], []).append(r)
    out = []
    for method, preset, side in TABLE3:
        if preset is None:  # the base model: the ReGiFT run's before, else any non-CoT run
            src = "correct" if "correct" in by else next(
                (p for p in by if p != "cot"), None)
        else:
            src = preset if preset in by else None
        if src is None:
            continue
        for r in by[src]:
            out.append({"method": method, "preset": src, "side": side, "mode": r["mode"],
                        "prompt": r["prompt"], "n_items": r["n_items"],
                        "metrics": dict(r[side])})
    return out


def render_markdown(runs_dir: str, rows: List[dict], base: List[dict], notes: List[str],
                    table3: List[dict], missing: List[dict]) -> str:
    metric_cols = " | ".join(HEADLINE)
    align = "|".join(["---:"] * len(HEADLINE))
    L = ["# Baselines and ablations: BBQ before / after training", "",
         f"Runs: `{runs_dir}/<preset>/experiment.json`. Metrics in percent (fractions x 100); "
         "`before` is the base model, `after` the trained student, evaluated by identical "
         "code on identical items. Losses are the last logged training and held-out "
         "losses (nats per target token).", ""]
    if base:
        L += ["## Base model (no training)", "",
              f"| mode | prompt | items | {metric_cols} | runs |",
              f"|---|---|---:|{align}|---|"]
        for b in base:
            cells = " | ".join(_fmt(b["metrics"][k]) for k in HEADLINE)
            L.append(f"| {b['mode']} | {b['prompt']} | {_fmt(b['n_items'], 'd')} | {cells} | "
                     f"{', '.join(b['runs'])} |")
        L.append("")
        L += [f"**Warning:** {n}" for n in notes]
        if notes:
            L.append("")
    if table3:
        L += ["## Paper Table 3", "",
              f"| method | run | mode | prompt | {metric_cols} |",
              f"|---|---|---|---|{align}|"]
        for t in table3:
            cells = " | ".join(_fmt(t["metrics"][k]) for k in HEADLINE)
            L.append(f"| {t['method']} | {t['preset']} ({t['side']}) | {t['mode']} | "
                     f"{t['prompt']} | {cells} |")
        L.append("")
    if rows:
        L += ["## All runs (before → after)", "",
              f"| preset | mode | prompt | items | steps | train loss | eval loss | "
              f"{metric_cols} |",
              f"|---|---|---|---:|---:|---:|---:|{align}|"]
        for r in rows:
            cells = " | ".join(f"{_fmt(r['before'][k])} {ARROW} {_fmt(r['after'][k])}"
                               for k in HEADLINE)
            L.append(f"| {r['preset']} | {r['mode']} | {r['prompt']} | "
                     f"{_fmt(r['n_items'], 'd')} | {_fmt(r['steps'], 'd')} | "
                     f"{_fmt(r['train_loss'], '.4f')} | {_fmt(r['eval_loss'], '.4f')} | "
                     f"{cells} |")
        L.append("")
    if missing:
        L += ["## Missing runs", ""]
        L += [f"- {m['preset']}: {m['reason']}" for m in missing]
        L.append("")
    if not rows:
        L += ["No results yet.", ""]
    return "\n".join(L)


def assemble(runs_dir: str, presets: Sequence[str], report_missing: bool = True,
             label: Optional[str] = None) -> dict:
    """Read ``<runs_dir>/<preset>/experiment.json`` of every preset, write comparison.md/.json
    into ``runs_dir``; returns the comparison dict (``markdown`` included).  ``label``: how the
    table names ``runs_dir`` (default: ``runs_dir``)."""
    label = runs_dir if label is None else label
    rows, missing = [], []
    for p in presets:
        path = os.path.join(runs_dir, p, RESULT)
        if not os.path.exists(path):
            if report_missing:
                missing.append({"preset": p, "reason": f"no {path}"})
            continue
        try:
            rows += rows_of(p, load_result(path))
        except ResultError as e:
            print(f"[run_presets] skipping {p}: {e}", file=sys.stderr)
            missing.append({"preset": p, "reason": str(e)})
    base, notes = base_rows(rows)
    t3 = table3_rows(rows)
    md = render_markdown(label, rows, base, notes, t3, missing)
    out = {"runs_dir": label, "units": "percent", "metrics": list(HEADLINE), "rows": rows,
           "base": base, "base_disagreements": notes, "table3": t3, "missing": missing}
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(runs_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(md)
    for n in notes:
        print(f"[run_presets] WARNING: {n}", file=sys.stderr)
    out["markdown"] = md
    return out


# ============================================================================ CLI
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/run_presets.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="",
                   help="comma-separated preset names (default with --table_only: every preset "
                        "of the config file that has a result)")
    p.add_argument("--config_file", default="configs/ablations.py",
                   help="config file with get_config(preset) (default: %(default)s)")
    p.add_argument("--runs_dir", default="runs/ablations",
                   help="parent of the per-preset work directories, where the table is written "
                        "(default: %(default)s)")
    p.add_argument("--extra", action="append", default=[],
                   help="extra arguments for every training run, e.g. "
                        "--extra=--config.train.num_epochs=2 (repeatable, shell-split)")
    p.add_argument("--source", default="",
                   help="trace set for every preset (the presets' source= argument)")
    p.add_argument("--python", default=sys.executable,
                   help="Python interpreter of the training runs (default: this one)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table_only", action="store_true",
                   help="only assemble the table from existing experiment.json files")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    config_file = args.config_file
    if not os.path.exists(_abs(config_file)):
        print(f"error: config file {config_file!r} not found", file=sys.stderr)
        return 2
    module = configs_util.load_module(os.path.abspath(_abs(config_file)))
    valid = tuple(getattr(module, "PRESETS", ()))
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    explicit = bool(presets)
    if not presets:
        if not args.table_only:
            print("error: --presets is required (e.g. --presets=correct,incorrect,all)",
                  file=sys.stderr)
            return 2
        presets = list(valid) or (sorted(
            d for d in os.listdir(_abs(args.runs_dir))
            if os.path.isdir(os.path.join(_abs(args.runs_dir), d)))
            if os.path.isdir(_abs(args.runs_dir)) else [])
    if valid:
        unknown = [p for p in presets if p not in valid]
        if unknown:
            print(f"error: unknown preset(s) {', '.join(unknown)} in {config_file}; valid: "
                  f"{', '.join(valid)}", file=sys.stderr)
            if "base_only" in unknown:
                print("note: the experiment always trains, so the base model has no preset; "
                      "its numbers are every run's eval_before (the 'Base model' rows of "
                      "comparison.md)", file=sys.stderr)
            return 2
    if len(set(presets)) != len(presets):
        print(f"error: a preset is listed twice in --presets={args.presets}", file=sys.stderr)
        return 2
    runs_dir = args.runs_dir
    runs_abs = _abs(runs_dir)

    if args.table_only:
        res = assemble(runs_abs, presets, report_missing=explicit, label=runs_dir)
        print(res["markdown"])
        print(f"[run_presets] wrote {os.path.join(runs_abs, 'comparison.md')}")
        return 0

    extra = [tok for e in args.extra for tok in shlex.split(e)]
    try:
        check_extra(extra, presets, module)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = []
    for p in presets:
        cmd = preset_command(args.python, config_file, p, runs_dir, extra, args.source)
        done = os.path.exists(os.path.join(runs_abs, p, RESULT))
        plan.append((p, cmd, done))
    if args.dry_run:
        for p, cmd, done in plan:
            if done:
                print(f"# skip {p}: {os.path.join(runs_dir, p, RESULT)} exists")
            else:
                print(shlex.join(cmd))
        return 0

    failed = []
    for i, (p, cmd, done) in enumerate(plan, 1):
        if done:
            print(f"[run_presets] {i}/{len(plan)} {p}: skipped, "
                  f"{os.path.join(runs_dir, p, RESULT)} exists", flush=True)
            continue
        print(f"[run_presets] {i}/{len(plan)} {p}: {shlex.join(cmd)}", flush=True)
        rc = run_one(cmd, os.path.join(runs_abs, p, "run_presets.log"))
        if rc != 0:
            print(f"[run_presets] {p} FAILED (exit {rc}); see "
                  f"{os.path.join(runs_dir, p, 'run_presets.log')}", flush=True)
            failed.append(p)
    res = assemble(runs_abs, presets, label=runs_dir)
    print(res["markdown"])
    print(f"[run_presets] wrote {os.path.join(runs_abs, 'comparison.md')}")
    if failed:
        print(f"[run_presets] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
