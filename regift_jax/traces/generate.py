"""Offline teacher trace generation (command line: :mod:`regift_jax.generate_traces`).

ReGiFT step 1: a reasoning teacher answers SQuAD-v2 questions as ``<think>R</think><answer>A
</answer>``; the trace keeps both correctness judgements and the ``regift_traces`` builder selects
the correct ones.

Work units are ``(question, sample_index)`` pairs over the configured SQuAD split (default: the
``pool`` split of :mod:`regift_jax.data.builders.squad_v2`), in a fixed order.  Process ``k`` of
``P`` takes units ``k, k+P, ...`` and writes its own files, so a pod generates in parallel with no
coordination beyond JAX's (each process uses its local devices).

Resumable and safe: every batch of records is written to its own file atomically (temp + rename)
under ``out_dir/parts/``; a restarted run reads the keys already written and skips them, so a run
killed at any moment (SIGKILL included) and restarted produces every unit exactly once.  When all
units of a process are done, its parts are compacted into ``traces-pNNNNN.jsonl.gz`` (gzip: the
records of one paragraph repeat its context; written atomically first; leftover parts already contained in it are deleted on the next start).  A
``manifest.json`` pins teacher, prompt and decoding settings: resuming with different settings is
refused with a clear error.

Decoding (``decode.mode``):

* ``single`` (the paper): one generation from the prompt + teacher prefill, stopping at
  ``</answer>``.
* ``two_phase`` (for small teachers that do not reliably close their tags): phase 1 generates the
  reasoning and stops at ``</think>``/``<answer>`` or ``max_reasoning_tokens``; the harness then
  closes the scaffold (``</think>\\n<answer>``) and phase 2 generates the answer until
  ``</answer>``.  Both phases are the teacher's own tokens; the inserted tags are recorded in the
  prompt version (``...+two_phase``).

At the end a summary (yield by answerable/unanswerable, reasoning length of correct vs incorrect
traces, as the paper's Figure 4) is printed and written to ``summary.json`` and ``summary.png``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import zlib
from typing import Dict, List

from absl import logging

THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "</think>", "<answer>", "</answer>"


def _maybe_init_distributed(cfg):
    import jax
    if cfg.get("distributed", "auto") == "off":
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()


def load_questions(cfg) -> List[dict]:
    from regift_jax.core.paths import default_source_dir
    from regift_jax.data.squad import (OFFICIAL_DEV_FILE, RECONSTRUCTED_DEV_FILE, article_bucket,
                                      read_squad_v2)
    src = cfg.data.squad_dir or default_source_dir("squad_v2")
    if not src:
        raise FileNotFoundError("no SQuAD-v2 directory: set --config.data.squad_dir")
    path = os.path.join(src, OFFICIAL_DEV_FILE)
    if not os.path.exists(path):
        path = os.path.join(src, RECONSTRUCTED_DEV_FILE)
    rows = read_squad_v2(path)
    split = cfg.data.split
    if split in ("pool", "heldout"):
        nb, pb = cfg.data.num_buckets, cfg.data.pool_buckets
        rows = [r for r in rows if (article_bucket(r["title"], nb) < pb) == (split == "pool")]
    elif split != "validation":
        raise ValueError(f"data.split must be pool, heldout or validation, got {split!r}")
    if cfg.data.max_questions > 0 or cfg.data.answerable_fraction >= 0:
        # Whole paragraphs in a seeded order (questions of one paragraph share the prompt
        # prefix, which the sampler prefills once); within them every answerable question and
        # a seeded share of unanswerable ones so that about ``answerable_fraction`` of the
        # kept questions are answerable (negative: keep the natural mix).
        import random
        rnd = random.Random(cfg.data.seed)
        paras: Dict[str, List[dict]] = {}
        for r in rows:
            paras.setdefault(r["context"], []).append(r)
        keys = sorted(paras)
        rnd.shuffle(keys)
        frac = cfg.data.answerable_fraction
        n_ans = sum(not r["is_impossible"] for r in rows)
        n_una = len(rows) - n_ans
        p_una = 1.0 if frac < 0 or n_una == 0 else min(1.0, n_ans * (1 - frac) / frac / n_una)
        out = []
        limit = cfg.data.max_questions if cfg.data.max_questions > 0 else len(rows)
        for k in keys:
            for r in paras[k]:
                if r["is_impossible"] and rnd.random() >= p_una:
                    continue
                out.append(r)
            if len(out) >= limit:
                break
        rows = out[:limit]
    return rows


def unit_seed(qid: str, sample_index: int) -> int:
    return zlib.crc32(f"{qid}/{sample_index}".encode()) & 0x7FFFFFFF


def _finals(out_dir: str, proc: int) -> List[str]:
    """This process's compacted shard(s): ``.jsonl.gz``, and a plain ``.jsonl`` of older runs."""
    base = os.path.join(out_dir, f"traces-p{proc:05d}.jsonl")
    return [p for p in (base + ".gz", base) if os.path.exists(p)]


def _read_done(out_dir: str, proc: int) -> Dict[tuple, int]:
    """Keys already written by this process (compacted file + parts)."""
    from regift_jax.data.records import open_shard
    done = {}
    files = _finals(out_dir, proc) + sorted(
        glob.glob(os.path.join(out_dir, "parts", f"p{proc:05d}-*.jsonl")))
    for f in files:
        with open_shard(f) as fh:
            for line in fh:
                try:
                    o = json.loads(line)
                    done[(o["id"], int(o["sample_index"]))] = 1
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def _write_atomic(path: str, lines: List[str]):
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as raw:
        if path.endswith(".gz"):
            import gzip
            # mtime 0 and no file name: the same records give the same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                f.write("".join(lines).encode("utf-8"))
        else:
            raw.write("".join(lines).encode("utf-8"))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)


def _check_manifest(out_dir: str, manifest: dict):
    path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(path):
        old = json.load(open(path))
        diffs = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diffs:
            raise SystemExit(f"error: {out_dir} holds traces made with other settings {diffs}; "
                             "use a new out_dir or the same config")
    else:
        _write_atomic(path, [json.dumps(manifest, indent=2, sort_keys=True)])


def _compact(out_dir: str, proc: int):
    from regift_jax.data.records import open_shard
    parts = sorted(glob.glob(os.path.join(out_dir, "parts", f"p{proc:05d}-*.jsonl")))
    olds = _finals(out_dir, proc)
    final = os.path.join(out_dir, f"traces-p{proc:05d}.jsonl.gz")
    if not parts and olds == [final]:
        return
    lines = []
    for old in olds:
        with open_shard(old, "rt") as fh:
            lines += fh.readlines()
    seen = set()
    for ln in lines:
        o = json.loads(ln)
        seen.add((o["id"], o["sample_index"]))
    for p in parts:
        for ln in open(p, encoding="utf-8"):
            o = json.loads(ln)
            k = (o["id"], o["sample_index"])
            if k not in seen:
                seen.add(k)
                lines.append(ln)
    _write_atomic(final, lines)
    for p in parts + [o for o in olds if o != final]:
        os.remove(p)


def summarize(records: List[dict], out_dir: str, wall_s: float) -> dict:
    import numpy as np
    s = {"wall_time_s": round(wall_s, 1), "records": len(records)}
    for name, crit in (("lenient", lambda r: r["lenient_correct"]),
                       ("strict_em", lambda r: r["exact_match"] >= 1.0)):
        d = {}
        for grp, sel in (("all", lambda r: True), ("answerable", lambda r: not r["is_impossible"]),
                         ("unanswerable", lambda r: r["is_impossible"])):
            rs = [r for r in records if sel(r)]
            d[grp] = {"n": len(rs), "correct": sum(bool(crit(r)) for r in rs),
                      "yield": (sum(bool(crit(r)) for r in rs) / len(rs)) if rs else None}
        s[f"yield_{name}"] = d
    lens = {k: [r["reasoning_tokens"] for r in records if bool(r["lenient_correct"]) == v]
            for k, v in (("correct", True), ("incorrect", False))}
    s["reasoning_tokens"] = {k: {"n": len(v), "mean": float(np.mean(v)) if v else None,
                                 "median": float(np.median(v)) if v else None}
                             for k, v in lens.items()}
    s["questions_with_a_correct_trace"] = len({r["id"] for r in records if r["lenient_correct"]})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        bins = np.linspace(0, max([1] + lens["correct"] + lens["incorrect"]), 30)
        for k, c in (("correct", "tab:green"), ("incorrect", "tab:red")):
            if lens[k]:
                ax[0].hist(lens[k], bins=bins, alpha=0.6, color=c, label=f"{k} (n={len(lens[k])})",
                           density=True)
        ax[0].set_xlabel("reasoning tokens")
        ax[0].set_title("Reasoning length by correctness (cf. paper Fig. 4)")
        ax[0].legend()
        y = s["yield_lenient"]
        groups = ["answerable", "unanswerable", "all"]
        ax[1].bar(groups, [100 * (y[g]["yield"] or 0) for g in groups], color="tab:blue")
        ax[1].set_ylabel("% correct (paper-lenient)")
        ax[1].set_title("Trace yield")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "summary.png"), dpi=110)
        plt.close(fig)
    except Exception as e:  # plotting is a convenience; the numbers are in summary.json
        logging.warning("summary plot failed: %s", e)
    return s


def _fmt1(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def write_data_card(out_dir: str, command: str, summary: dict, manifest: dict) -> str:
    """``out_dir/README.md``: what the trace set is, how it was made, what it yields."""
    yl = summary["yield_lenient"]
    ys = summary["yield_strict_em"]
    rt = summary["reasoning_tokens"]
    pct = lambda d: "n/a" if d["yield"] is None else f"{100 * d['yield']:.1f}%"  # noqa: E731
    lines = [
        "# ReGiFT teacher traces (SQuAD-v2 pool) — data card", "",
        f"- **Teacher**: {manifest['teacher']}",
        f"- **Prompt**: `{manifest['prompt_version']}` (chat template: {manifest['chat']}; "
        f"prefill `{manifest['prefill'].strip()}`)",
        f"- **Decoding**: {json.dumps(manifest['decoding'])}, mode `{manifest['mode']}` "
        f"(reasoning budget {manifest['max_reasoning_tokens']} tokens, answer budget "
        f"{manifest['max_answer_tokens']}), {manifest['num_samples']} samples per question",
        f"- **Source questions**: SQuAD-v2 dev, `{manifest['split']}` split "
        "(article-hash split, see `regift_jax/data/builders/squad_v2.py`)",
        f"- **Command**: `{command}`",
        f"- **Hardware**: {summary.get('hardware') or 'not recorded'}",
        *([f"- **Progress**: {summary['units_written']} of {summary['units_configured']} "
           f"(question, sample) units written "
           f"({100 * summary['units_written'] / max(1, summary['units_configured']):.0f}%); "
           "the same command resumes the rest"]
          if summary.get("units_configured") else []),
        f"- **Wall time** (first start to last write, restarts included): "
        f"{summary.get('elapsed_since_start_s', summary['wall_time_s']):.0f} s", "",
        "| | records | correct (paper-lenient) | yield | correct (strict EM) |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in ("answerable", "unanswerable", "all"):
        lines.append(f"| {g} | {yl[g]['n']} | {yl[g]['correct']} | {pct(yl[g])} | "
                     f"{ys[g]['correct']} ({pct(ys[g])}) |")
    lines += [
        "", f"Questions with at least one correct trace: "
        f"{summary['questions_with_a_correct_trace']}.",
        f"Reasoning length (tokens): correct mean {_fmt1(rt['correct']['mean'])}, incorrect mean "
        f"{_fmt1(rt['incorrect']['mean'])} (plot: `summary.png`).",
        *([f"Lines written but unusable (counted, not in the table): "
           f"{summary['read_report']['n_dropped']} — "
           + ", ".join(f"{k}: {v}" for k, v in sorted(
               summary['read_report']['dropped'].items(), key=lambda kv: -kv[1]))]
          if summary.get("read_report", {}).get("n_dropped") else []), "",
        "Every record (correct and incorrect) is kept; the `regift_traces` TFDS builder's "
        "`correct` config selects the paper-lenient correct ones (the training default), "
        "`incorrect`/`all` serve the correctness ablation.", "",
        "## Licence", "",
        "Contexts, questions and gold answers come from SQuAD 2.0 (Rajpurkar, Jia, Liang, ACL "
        "2018), licensed CC BY-SA 4.0; this trace set is Adapted Material and is shared under "
        "the same licence, CC BY-SA 4.0 (see `data/squad_v2/`). The generated text was produced "
        "by SmolLM2-135M-Instruct (Apache-2.0).", ""]
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run(cfg) -> dict:
    import jax
    from tqdm.auto import tqdm

    from regift_jax import models
    from regift_jax.core import prompts
    from regift_jax.models.sampling import Continuation, SamplingConfig
    from regift_jax.traces.judge import judge
    from regift_jax.data.records import parse_teacher_output

    from regift_jax.core import configs_util
    configs_util.apply_xla_cpu_flags(cfg.get("xla_cpu_flags", ""))  # before JAX starts
    _maybe_init_distributed(cfg)
    proc, nproc = jax.process_index(), jax.process_count()
    out_dir = cfg.out_dir
    os.makedirs(os.path.join(out_dir, "parts"), exist_ok=True)

    tmpl = prompts.get_template(cfg.prompt.template, cfg.prompt.version or None)
    if cfg.prompt.prefill is not None:
        tmpl = tmpl.with_prefill(cfg.prompt.prefill)
    two_phase = cfg.decode.mode == "two_phase"
    if cfg.decode.mode not in ("single", "two_phase"):
        raise ValueError(f"decode.mode must be single or two_phase, got {cfg.decode.mode!r}")
    prompt_version = tmpl.id + ("+two_phase" if two_phase else "")
    max_new = (cfg.decode.max_reasoning_tokens + cfg.decode.max_answer_tokens if two_phase
               else cfg.decode.max_new_tokens)
    sc = SamplingConfig(max_new_tokens=max_new,
                        temperature=cfg.decode.temperature, top_p=cfg.decode.top_p,
                        top_k=cfg.decode.top_k, stop_strings=(ANSWER_CLOSE,),
                        seed=cfg.decode.seed)
    decoding = {"temperature": sc.temperature, "top_p": sc.top_p, "top_k": sc.top_k,
                "max_new_tokens": sc.max_new_tokens, "seed": sc.seed}
    manifest = {"teacher": cfg.teacher.name, "prompt_version": prompt_version,
                "prefill": tmpl.prefill, "chat": bool(cfg.teacher.chat), "decoding": decoding,
                "mode": cfg.decode.mode, "max_reasoning_tokens": cfg.decode.max_reasoning_tokens,
                "max_answer_tokens": cfg.decode.max_answer_tokens,
                "num_samples": cfg.num_samples, "split": cfg.data.split}
    if proc == 0:
        _check_manifest(out_dir, manifest)

    if cfg.get("finalize_only", False):
        # Compact what has been generated so far and write the summary / data card, without
        # loading the teacher: a partial set is usable and a later run resumes it.
        return _finish(cfg, out_dir, proc, manifest, time.time())

    questions = load_questions(cfg)
    units = [(qi, s) for qi in range(len(questions)) for s in range(cfg.num_samples)]
    mine = units[proc::nproc]
    done = _read_done(out_dir, proc)
    todo = [u for u in mine if (questions[u[0]]["id"], u[1]) not in done]
    logging.info("process %d/%d: %d units, %d already done, %d to do", proc, nproc, len(mine),
                 len(mine) - len(todo), len(todo))

    t0 = time.time()
    handle = models.load(cfg.teacher.model, dtype=cfg.teacher.dtype)
    tok = handle.tokenizer
    sampler = handle.sampler(batch_size=cfg.batch_size, length_bucket=cfg.length_bucket,
                             chunk=cfg.decode.chunk, cache_len=cfg.cache_len or None,
                             unroll_layers=cfg.get("unroll_layers", False))
    logging.info("teacher %s loaded in %.1fs", cfg.teacher.name, time.time() - t0)

    def prompt_text(q):
        return prompts.render_for_model(tmpl, tok, chat=cfg.teacher.chat, context=q["context"],
                                        question=q["question"])

    existing = sorted(glob.glob(os.path.join(out_dir, "parts", f"p{proc:05d}-*.jsonl")))
    part_no = 1 + max([int(os.path.basename(p)[7:13]) for p in existing] or [0])
    n_ok = n_total = 0
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"traces p{proc}",
               unit="trace", dynamic_ncols=True, disable=not cfg.progress)
    t_start = time.time()
    # Group the remaining units by paragraph (shared prompt prefix), keep the unit order.
    groups: Dict[str, List[tuple]] = {}
    for u in todo:
        groups.setdefault(questions[u[0]]["context"], []).append(u)
    batches = []
    for units_ in groups.values():
        for b0 in range(0, len(units_), cfg.batch_size):
            batches.append(units_[b0:b0 + cfg.batch_size])
    sc1 = SamplingConfig(max_new_tokens=cfg.decode.max_reasoning_tokens,
                         temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
                         stop_strings=(THINK_CLOSE, ANSWER_OPEN), seed=sc.seed)
    sc2 = SamplingConfig(max_new_tokens=cfg.decode.max_answer_tokens,
                         temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
                         stop_strings=(ANSWER_CLOSE,), seed=sc.seed + 1)

    def bridge(texts):
        # close the reasoning scaffold after phase 1, whichever way phase 1 ended
        out = []
        for t in texts:
            if t.endswith(ANSWER_OPEN):
                out.append("")
            elif t.endswith(THINK_CLOSE):
                out.append("\n" + ANSWER_OPEN)
            else:
                out.append("\n" + THINK_CLOSE + "\n" + ANSWER_OPEN)
        return out

    for chunk in batches:
        qs = [questions[qi] for qi, _ in chunk]
        full = [prompt_text(q) for q in qs]
        marker = "Question:\n"
        cut = full[0].rfind(marker, 0, full[0].rfind(qs[0]["question"]) + 1)
        prefix = full[0][:cut + len(marker)] if cut >= 0 else None
        if prefix is None or not all(f.startswith(prefix) for f in full):
            prefix = None
        ptexts = [f[len(prefix):] for f in full] if prefix else full
        seeds = [unit_seed(q["id"], s) for q, (_, s) in zip(qs, chunk)]
        if two_phase:
            gs_ = sampler.generate(ptexts, sc1, row_seeds=seeds, prefix=prefix,
                                   then=Continuation(bridge, sc2))
            gens = []
            for g in gs_:
                text = g.text
                if ANSWER_CLOSE not in text:
                    text = text.rstrip() + " " + ANSWER_CLOSE  # answer budget exhausted: close
                gens.append((text, g.generated_tokens, g.prompt_tokens))
        else:
            gs_ = sampler.generate(ptexts, sc, row_seeds=seeds, prefix=prefix)
            gens = [(g.text, g.generated_tokens, g.prompt_tokens) for g in gs_]
        lines = []
        for q, (qi, s), (text, n_gen, n_prompt) in zip(qs, chunk, gens):
            raw = prompts.restore_prefill(tmpl, text)
            reasoning, answer, _problems = parse_teacher_output(raw, prefilled_think=True)
            golds = [a["text"] if isinstance(a, dict) else a for a in q["answers"]]
            j = judge(answer, golds)
            rec = {
                "id": q["id"], "context": q["context"], "question": q["question"],
                "gold_answers": golds, "is_impossible": bool(q["is_impossible"]),
                "teacher": cfg.teacher.name, "prompt_version": prompt_version,
                "decoding": decoding, "sample_index": int(s), "raw_generation": raw,
                "reasoning": reasoning, "answer": answer, "exact_match": float(j.exact_match),
                "f1": float(j.f1), "lenient_correct": bool(j.lenient_correct),
                "reasoning_tokens": len(tok(reasoning, add_special_tokens=False)["input_ids"]),
                "prompt_tokens": int(n_prompt), "generated_tokens": int(n_gen),
            }
            n_ok += rec["lenient_correct"]
            n_total += 1
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        _write_atomic(os.path.join(out_dir, "parts", f"p{proc:05d}-{part_no:06d}.jsonl"), lines)
        part_no += 1
        bar.update(len(chunk))
        el = time.time() - t_start
        bar.set_postfix(traces_per_s=f"{n_total / el:.2f}", yield_=f"{n_ok / max(1, n_total):.1%}")
    bar.close()
    return _finish(cfg, out_dir, proc, manifest, t0,
                   hardware=f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def _finish(cfg, out_dir, proc, manifest, t0, hardware: str = "") -> dict:
    _compact(out_dir, proc)
    wall = time.time() - t0
    from regift_jax.data.records import read_trace_jsonl
    recs, report = read_trace_jsonl(sorted(glob.glob(os.path.join(out_dir, "traces-p*.jsonl*"))))
    records = [r.to_dict() for r in recs]
    s = summarize(records, out_dir, wall) if proc == 0 else {}
    s["read_report"] = report.to_dict()
    if proc == 0:
        finals = glob.glob(os.path.join(out_dir, "traces-p*.jsonl*"))
        man = os.path.join(out_dir, "manifest.json")
        if float(cfg.get("wall_time_s", 0) or 0) > 0:  # measured elsewhere (files were moved)
            s["elapsed_since_start_s"] = float(cfg.wall_time_s)
        elif finals and os.path.exists(man):  # first start to last write, restarts included
            s["elapsed_since_start_s"] = round(
                max(os.path.getmtime(f) for f in finals) - os.path.getmtime(man), 1)
        s["hardware"] = cfg.get("hardware", "") or hardware
        try:  # progress against the configured work (a time-bounded run stops part-way)
            s["units_configured"] = len(load_questions(cfg)) * int(cfg.num_samples)
            s["units_written"] = int(report.n_lines)
        except (OSError, ValueError) as e:
            logging.warning("could not count the configured units: %s", e)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in s.items() if k != "read_report"}, f, indent=2)
        args = [a for a in sys.argv[1:] if not any(
            k in a for k in ("finalize_only", "config.hardware", "config.wall_time_s"))]
        write_data_card(out_dir, "python -m regift_jax.generate_traces " + " ".join(args),
                        s, manifest)
        print(json.dumps({k: v for k, v in s.items() if k != "read_report"}, indent=1))
        print(f"dropped on read: {report.summary()}")
    return s

