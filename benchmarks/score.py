"""BBQ log-likelihood scoring throughput: this project's jitted scorer vs a transformers baseline.

    python benchmarks/score.py [--max_items 160] [--batch_rows 8] [--baseline_items 16]
                               [--method prefix] [--json out.json] [--xla_cpu_flags xnnpack]

What is measured
----------------
* **Ours**: :func:`regift_jax.eval.loglik.score_requests` on the BBQ items of the available
  categories (the data root's ``bbq/``, by default the vendored ``data/bbq``: 11,956 items in six
  categories), ``bbq_base`` prompt in the chat
  template, SmolLM2-135M-Instruct (float32), ``batch_rows`` items per batch.  The subset is
  :func:`regift_jax.eval.subset.select_subset`'s (whole context paragraphs, as in a full run).
  Pass 1 includes compilation; pass 2 (``--repeats 2``) runs the same batches again, compiled.
* **Baseline**: the transformers model of the same GGUF, lm-eval-harness style: every
  ``prompt + option`` is its own sequence, sequences sorted by length and batched
  ``3 x batch_rows`` at a time (the same items and batch of items), right-padded, one forward
  each, log-softmax gathered at the option tokens.  Run on the first ``--baseline_items`` items
  of the same subset (after one untimed warm-up batch).  Its scores are compared with ours.

Extrapolation (printed as EXTRAPOLATED whenever fewer than all items were run)
-----------------------------------------------------------------------------
The whole set is tokenised and planned without the model (:func:`plan_prefix`), giving its
padded token slots and compiled shapes.  Ours: full time = full token slots / (subset token
slots / pass-2 time) + (full shapes / subset shapes) x (pass-1 - pass-2 time).  Baseline: full
time = subset time x (full real tokens of ``3 x (prompt + option)`` / subset real tokens).  The
ratio is baseline time / our time on the whole set.

The machine may be shared: the load average is printed before and after every phase, and the
process CPU seconds of each timed phase beside its wall time (a ratio of CPU seconds per item is
printed too; it is less sensitive to other processes than wall time).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from regift_jax.core import configs_util  # noqa: E402  (no JAX: the XLA flags go first)
from regift_jax.data import bbq as bbq_data  # noqa: E402


def load_avg() -> str:
    try:
        a = os.getloadavg()
        return f"load average {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unavailable"


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_time(s: float) -> str:
    return f"{s:8.1f} s ({s / 60:.1f} min)"


def torch_scores(model, requests, batch_seqs: int, pad_id: int):
    """lm-eval-harness style: one sequence per (prompt, option), sorted by length, batched."""
    import torch  # lazy: the baseline's optional test dependency
    seqs = [(i, k, list(r.context) + list(c), len(r.context))
            for i, r in enumerate(requests) for k, c in enumerate(r.continuations)]
    seqs.sort(key=lambda s: -len(s[2]))
    out = np.zeros((len(requests), len(requests[0].continuations)))
    for b in range(0, len(seqs), batch_seqs):
        chunk = seqs[b:b + batch_seqs]
        T = max(len(s[2]) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s[2])] = torch.tensor(s[2])
            mask[j, :len(s[2])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for j, (i, k, seq, n) in enumerate(chunk):
            rows = logits[j, n - 1:len(seq) - 1].double()
            lp = torch.log_softmax(rows, -1)
            out[i, k] = float(lp[torch.arange(len(seq) - n), torch.tensor(seq[n:])].sum())
    return out


def load_torch_model(handle_source: str):
    # lazy: the baseline's optional test dependencies
    import torch
    import transformers
    if handle_source.endswith(".gguf"):
        d, f = os.path.split(handle_source)
        m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f,
                                                              dtype=torch.float32)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(handle_source,
                                                              dtype=torch.float32)
    return m.eval()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bbq_dir", default="",
                    help="<Category>.jsonl files (default: the data root's bbq/)")
    ap.add_argument("--categories", default="",
                    help="comma-separated (default: every category file in --bbq_dir)")
    ap.add_argument("--prompt", default="bbq_base")
    ap.add_argument("--max_items", type=int, default=160,
                    help="time a balanced subset of this many items and extrapolate "
                         "(0 = the whole set)")
    ap.add_argument("--batch_rows", type=int, default=8)
    ap.add_argument("--method", default="prefix", choices=("prefix", "packed", "unpacked"))
    ap.add_argument("--length_bucket", type=int, default=16)
    ap.add_argument("--compile_cost_tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2, choices=(1, 2),
                    help="2 = also time a compiled second pass (default)")
    ap.add_argument("--baseline_items", type=int, default=16,
                    help="items for the transformers baseline (0 = skip it)")
    ap.add_argument("--json", default="", help="write the figures to this file")
    ap.add_argument("--xla_cpu_flags", default="config",
                    help=configs_util.XLA_CPU_FLAGS_HELP)
    return ap.parse_args(argv)


def time_ours(a, score, reqs, res, plan_all, plan_sub, full_run):
    """Time ``score()`` (our scorer on ``reqs``, ``a.repeats`` passes); the whole-set time
    into ``res``."""
    times, cpu, scores = [], [], None
    for rep in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        scores = score()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        log(f"[ours] pass {rep + 1}{' (includes compilation)' if rep == 0 else ' (compiled)'}: "
            f"{len(reqs)} items in {times[-1]:.1f} s = {len(reqs) / times[-1]:.2f} items/s "
            f"(process CPU {cpu[-1]:.1f} s); {load_avg()}")
    t1, t2 = times[0], times[-1]
    N_all = res["n_items_total"]
    res.update(pass1_s=t1, pass2_s=t2 if a.repeats > 1 else None, cpu_s=cpu,
               items_per_s_pass1=len(reqs) / t1)
    if full_run:
        ours_full = t1
        log(f"[ours] MEASURED whole set: {fmt_time(t1)} incl. compilation")
    else:
        steady = t2 if a.repeats > 1 else t1
        compile_s = max(0.0, t1 - t2) if a.repeats > 1 else 0.0
        if a.method == "prefix":
            rate = plan_sub.tokens_computed / steady
            ours_full = plan_all.tokens_computed / rate + compile_s * (
                plan_all.programs / max(plan_sub.programs, 1))
        else:
            ours_full = steady * N_all / len(reqs) + compile_s
        log(f"[ours] EXTRAPOLATED to all {N_all} items: {fmt_time(ours_full)} "
            f"({N_all / ours_full:.2f} items/s; compiled-pass rate "
            f"{len(reqs) / steady:.2f} items/s, compilation ~{compile_s:.0f} s for "
            f"{plan_sub.programs} shapes)")
    res.update(ours_full_s=ours_full, ours_full_extrapolated=not full_run,
               goal_10_min_met=ours_full <= 600)
    return scores, cpu[-1]


def time_baseline(a, handle, reqs, reqs_all, scores, ours_cpu, res):
    """The transformers baseline on the first ``a.baseline_items`` items, into ``res``."""
    import torch  # lazy: the baseline's optional test dependency
    t = time.perf_counter()
    tm = load_torch_model(handle.source)
    log(f"[baseline] transformers {transformers_version()} model loaded in "
        f"{time.perf_counter() - t:.1f} s (not counted); torch threads "
        f"{torch.get_num_threads()}")
    breq = reqs[:a.baseline_items]
    pad = handle.cfg.pad_token_id or 0
    torch_scores(tm, breq[:max(1, a.batch_rows // 2)], 3 * a.batch_rows, pad)  # warm-up
    log(f"[baseline] {load_avg()}")
    t, c = time.perf_counter(), time.process_time()
    ref = torch_scores(tm, breq, 3 * a.batch_rows, pad)
    tb, cb = time.perf_counter() - t, time.process_time() - c
    diff = float(np.max(np.abs(ref - scores.logprob_sum[:len(breq)])))
    naive = lambda rs: sum(len(r.context) * len(r.continuations)  # noqa: E731
                           + sum(len(c) for c in r.continuations) for r in rs)
    base_full = tb * naive(reqs_all) / naive(breq)
    ours_full = res["ours_full_s"]
    log(f"[baseline] {len(breq)} items in {tb:.1f} s = {len(breq) / tb:.2f} items/s "
        f"(process CPU {cb:.1f} s); max |ours - transformers| = {diff:.2e}; {load_avg()}")
    log(f"[baseline] EXTRAPOLATED to all {len(reqs_all)} items: {fmt_time(base_full)}")
    log(f"ratio (baseline / ours, whole set, wall time): {base_full / ours_full:.1f}x")
    # Per-item CPU seconds on the first baseline_items items: less sensitive to other
    # processes than wall time on a shared machine.
    ours_cpu_item = ours_cpu / len(reqs)
    base_cpu_item = cb / len(breq)
    log(f"ratio (baseline / ours, process CPU seconds per item, timed items): "
        f"{base_cpu_item / ours_cpu_item:.1f}x ({base_cpu_item:.2f} vs "
        f"{ours_cpu_item:.2f} s/item)")
    res.update(baseline_items=len(breq), baseline_s=tb, baseline_cpu_s=cb,
               baseline_items_per_s=len(breq) / tb, baseline_full_s=base_full,
               ratio=base_full / ours_full, ratio_cpu_per_item=base_cpu_item / ours_cpu_item,
               max_abs_diff=diff)


def main(argv=None):
    a = parse_args(argv)
    xla_flags = configs_util.apply_cli_xla_cpu_flags(a.xla_cpu_flags)
    # lazy: JAX starts with these imports, after the XLA flags above are set
    import jax
    from regift_jax import models
    from regift_jax.eval import loglik, subset

    log(f"# BBQ log-likelihood scoring benchmark ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    log(f"jax {jax.__version__} on {jax.devices()[0].platform}; {load_avg()}; "
        f"XLA_FLAGS={xla_flags!r}")
    bbq_dir = a.bbq_dir or bbq_data.default_bbq_dir()
    cats = [c for c in a.categories.split(",") if c] or bbq_data.available_categories(bbq_dir)
    items = bbq_data.load_bbq(bbq_dir, cats)
    flat_all = [it for c in cats for it in items[c]]
    N_all = len(flat_all)
    full_run = a.max_items <= 0 or a.max_items >= N_all
    sub = items if full_run else subset.select_subset(items, max_items=a.max_items)
    flat = [it for c in cats for it in sub[c]]
    log(f"categories: {', '.join(cats)}: {N_all} items; timing "
        f"{'all of them' if full_run else f'a balanced subset of {len(flat)}'}")

    t = time.perf_counter()
    handle = models.load(a.model)
    log(f"model {a.model} loaded in {time.perf_counter() - t:.1f} s (not counted)")
    t = time.perf_counter()
    reqs_all, _, _ = loglik.bbq_requests(flat_all, a.prompt, handle.tokenizer)
    t_tok_all = time.perf_counter() - t
    key = {it.key: n for n, it in enumerate(flat_all)}
    reqs = [reqs_all[key[it.key]] for it in flat]
    kw = dict(batch_rows=a.batch_rows, length_bucket=a.length_bucket,
              compile_cost_tokens=a.compile_cost_tokens)
    plan_all = loglik.plan_prefix(reqs_all, **kw)
    plan_sub = loglik.plan_prefix(reqs, **kw)
    log(f"tokenised {N_all} items in {t_tok_all:.1f} s; shared prefix {plan_all.n_pre} tokens; "
        f"real tokens/item {plan_all.tokens_real / N_all:.1f}, padded slots/item "
        f"{plan_all.tokens_computed / N_all:.1f}; {plan_all.programs} compiled shapes for the "
        f"whole set, {plan_sub.programs} for the timed items")

    log(f"[ours] {load_avg()}")
    res = {"n_items_total": N_all, "n_items_timed": len(reqs), "method": a.method,
           "batch_rows": a.batch_rows, "xla_flags": xla_flags,
           "tokens_real_per_item": plan_all.tokens_real / N_all,
           "slots_per_item": plan_all.tokens_computed / N_all,
           "programs_full": plan_all.programs, "programs_timed": plan_sub.programs}
    scores, ours_cpu = time_ours(
        a, lambda: loglik.score_requests(handle, reqs, method=a.method, progress="ours", **kw),
        reqs, res, plan_all, plan_sub, full_run)
    if a.baseline_items > 0:
        time_baseline(a, handle, reqs, reqs_all, scores, ours_cpu, res)
    ours_full = res["ours_full_s"]
    log(f"goal (whole set in <= 10 min): {'met' if ours_full <= 600 else 'NOT met'} "
        f"({ours_full / 60:.1f} min{', extrapolated' if not full_run else ''})")
    log(f"end: {load_avg()}")
    res["load_average_end"] = load_avg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def transformers_version() -> str:
    import transformers  # lazy: the baseline's optional test dependency
    return transformers.__version__


if __name__ == "__main__":
    main()
