"""The "TPU by compilation" table of BENCHMARKS.md: the paper presets compiled for TPU slices on
this CPU by the TPU preflight (``python -m regift_jax.preflight``): fits or not, GiB per chip,
the ESTIMATED step time, tokens/s per chip and MFU.

    python benchmarks/tpu_preflight.py --cells=llama8b_lora@v5e-8,llama8b_lora_remat_full@v5e-8
    python benchmarks/tpu_preflight.py --all          # every cell still missing (hours on 2 cores)
    python benchmarks/tpu_preflight.py --table        # rewrite the BENCHMARKS.md section

Each cell runs the preflight command line in its own process (one 8B compile holds ~2 GB and
takes 1.5-7 minutes on 2 cores, plus three costing compiles for the estimate) and writes
``benchmarks/results/tpu/<cell>.json``; cells whose JSON exists are skipped, so an interrupted run
resumes.  The table lists every planned cell, ``not run`` where no JSON exists yet, and beside
each the figures of the same cell before activations were pinned to the mesh
(``results/tpu/before_activation_sharding/``, the seventh session's before/after).  Needs libtpu
(``pip install -e '.[tpu]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results", "tpu")
MD = os.path.join(REPO, "BENCHMARKS.md")
HEADING = "## TPU by compilation"
SLICES = ("v4-8", "v4-32", "v5e-8", "v5e-16", "v5p-8", "v6e-8")
REMAT_FULL = ("--config.model.remat_policy=full",)
REMAT_DOTS = ("--config.model.remat_policy=dots_with_no_batch_dims",)

# name -> (label, config, extra preflight flags).  "As shipped" is the preset now: remat full,
# the 32 examples in one micro-batch, attention_impl "auto" (splash on TPU).
BEFORE_TUNING = ("--config.train.micro_batch=16", "--config.model.attention_impl=einsum")
PRESETS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "llama8b_lora": ("Llama-3.1-8B LoRA, remat dots (the sixth session's preset before tuning)",
                     "configs/llama.py:llama3_1_8b", REMAT_DOTS + BEFORE_TUNING),
    "llama8b_lora_mb16_einsum": ("Llama-3.1-8B LoRA, remat full, micro_batch 16, einsum (the "
                                 "preset before this session's tuning)",
                                 "configs/llama.py:llama3_1_8b", REMAT_FULL + BEFORE_TUNING),
    "llama8b_lora_remat_full": ("Llama-3.1-8B LoRA (as shipped: remat full, one micro-batch, "
                                "splash)", "configs/llama.py:llama3_1_8b", REMAT_FULL),
    "llama8b_lora_dots": ("Llama-3.1-8B LoRA, remat dots_with_no_batch_dims, one micro-batch, "
                          "splash (tuning)", "configs/llama.py:llama3_1_8b", REMAT_DOTS),
    "llama8b_full": ("Llama-3.1-8B full FT, remat dots (the sixth session's preset before "
                     "tuning)", "configs/llama.py:llama3_1_8b_full", REMAT_DOTS + BEFORE_TUNING),
    "llama8b_full_mb16_einsum": ("Llama-3.1-8B full FT, remat full, micro_batch 16, einsum (the "
                                 "preset before this session's tuning)",
                                 "configs/llama.py:llama3_1_8b_full", REMAT_FULL + BEFORE_TUNING),
    "llama8b_full_remat_full": ("Llama-3.1-8B full FT (as shipped: remat full, one micro-batch, "
                                "splash)", "configs/llama.py:llama3_1_8b_full", REMAT_FULL),
    "llama8b_full_mb32": ("Llama-3.1-8B full FT, remat full, one micro-batch, einsum (tuning: "
                          "splash's share)", "configs/llama.py:llama3_1_8b_full",
                          REMAT_FULL + ("--config.model.attention_impl=einsum",)),
    "mistral7b_lora_remat_full": ("Mistral-7B LoRA (as shipped: remat full, one micro-batch, "
                                  "splash)", "configs/mistral.py:mistral_7b", REMAT_FULL),
    "phi4_lora": ("Phi-4 LoRA (as shipped: remat full, one micro-batch, splash)",
                  "configs/phi4.py:phi4", ()),
    "r1_qwen32b_decode": ("R1-Distill-Qwen-32B decode, 64 x 1,536 (as shipped: teacher.mesh "
                          "fsdp=-1,tensor=8, bf16 weights)",
                          "configs/teacher_qwen2.py:r1_distill_qwen_32b", ("--stages=decode",)),
    "r1_qwen32b_decode_fsdp": ("R1-Distill-Qwen-32B decode, 64 x 1,536, mesh fsdp=-1",
                               "configs/teacher_qwen2.py:r1_distill_qwen_32b",
                               ("--mesh=fsdp=-1", "--stages=decode")),
    "r1_qwen32b_decode_tp": ("R1-Distill-Qwen-32B decode, 64 x 1,536, mesh fsdp=2,tensor=8",
                             "configs/teacher_qwen2.py:r1_distill_qwen_32b",
                             ("--mesh=fsdp=2,tensor=8", "--stages=decode")),
    # a 4-chip slice (v4-8, v5p-8) cannot take the preset's tensor=8
    "r1_qwen32b_decode_t4": ("R1-Distill-Qwen-32B decode, 64 x 1,536, mesh fsdp=-1,tensor=4 "
                             "(for 4-chip slices)", "configs/teacher_qwen2.py:r1_distill_qwen_32b",
                             ("--mesh=fsdp=-1,tensor=4", "--stages=decode")),
    "bbq_llama8b_fsdp": ("BBQ log-likelihood, Llama-3.1-8B, mesh fsdp=-1", "configs/eval.py",
                         ("--model=llama-3.1-8b", "--mesh=fsdp=-1")),
}
# The order cells run in (the tuning questions first).
PRIORITY = ("llama8b_lora_mb16_einsum@v5e-8", "llama8b_lora_remat_full@v5e-8",
            "llama8b_full_mb16_einsum@v6e-8", "llama8b_full_remat_full@v6e-8",
            "llama8b_full_mb16_einsum@v5p-8", "llama8b_full_remat_full@v5p-8",
            "llama8b_full_mb32@v6e-8", "llama8b_lora_dots@v5p-8",
            "r1_qwen32b_decode@v5e-16", "r1_qwen32b_decode_fsdp@v5e-16",
            "r1_qwen32b_decode_tp@v5e-16", "r1_qwen32b_decode_t4@v4-8",
            "r1_qwen32b_decode_t4@v5p-8", "llama8b_lora@v5e-8", "llama8b_full@v6e-8")


# The paper presets as shipped: the table's rows on every slice (the other presets are the
# before/after and mesh comparisons of PRIORITY).
SHIPPED = ("llama8b_lora_remat_full", "llama8b_full_remat_full", "mistral7b_lora_remat_full",
           "phi4_lora", "r1_qwen32b_decode", "bbq_llama8b_fsdp")


def all_cells() -> List[str]:
    rest = [f"{p}@{s}" for s in SLICES for p in SHIPPED]
    return list(PRIORITY) + [c for c in rest if c not in PRIORITY]


BEFORE = os.path.join(OUT, "before_activation_sharding")


def cell_path(cell: str, folder: str = OUT) -> str:
    return os.path.join(folder, cell.replace("@", "__") + ".json")


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _before(cell: str, stage: str) -> str:
    """``GiB, tokens/s`` of the same cell and stage before the activation-sharding fix."""
    rec = _load(cell_path(cell, BEFORE))
    r = [x for x in (rec or {}).get("reports", []) if x["stage"] == stage]
    if not r:
        return ""
    r = r[0]
    gib = "-" if r["hbm_gib_per_chip"] is None else f"{r['hbm_gib_per_chip']:.1f}"
    tok = r.get("tokens_per_s_per_chip")
    return f"{gib}, {'-' if tok is None else f'{tok:,.0f}'}"


def run_cell(cell: str) -> dict:
    preset, accel = cell.split("@")
    _, config, extra = PRESETS[preset]
    path = cell_path(cell)
    cmd = [sys.executable, "-m", "regift_jax.preflight", f"--config={config}",
           f"--accelerator_type={accel}", f"--out={path}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    print("\n".join(lines) or r.stderr[-3000:], flush=True)
    if not os.path.exists(path):  # e.g. the preset's mesh does not divide the slice
        errors = [x for x in (r.stderr + r.stdout).splitlines() if x.startswith("error:")]
        rec = {"reports": [], "error": (errors or [f"exit {r.returncode}"])[-1][:200]}
    else:
        with open(path) as f:
            rec = json.load(f)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True).stdout.strip()
    rec.update(cell=cell, command=" ".join(cmd[1:]).replace(path, "REPORT.json"),
               wall_seconds=round(time.time() - t0, 1), commit=commit)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def _row(cell: str) -> str:
    preset, accel = cell.split("@")
    label = PRESETS[preset][0]
    rec = _load(cell_path(cell))
    if rec is None:
        old = _load(cell_path(cell, BEFORE)) or {}
        stages = [r["stage"] for r in old.get("reports", [])] or [""]
        return "\n".join(f"| {label}{f' [{st}]' if st else ''} | {accel} | not run | | | | | | "
                         f"{_before(cell, st)} | |" for st in stages)
    if not rec["reports"]:
        return f"| {label} | {accel} | cannot run: {rec.get('error', '?')} | | | | | | | |"
    out = []
    for r in rec["reports"]:
        mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        gib = "-" if r["hbm_gib_per_chip"] is None else f"{r['hbm_gib_per_chip']:.1f}"
        est = lambda k, f: "-" if r.get(k) is None else f.format(r[k])  # noqa: E731
        out.append(f"| {label} [{r['stage']}] | {accel} | {'yes' if r['fits'] else '**no**'} | "
                   f"{gib} / {r['hbm_capacity_gib']:g} | {mesh}, remat {r['remat_policy']} | "
                   f"{est('step_seconds', '{:.3g}')} | {est('tokens_per_s_per_chip', '{:,.0f}')} | "
                   f"{est('mfu', '{:.0%}')} | {_before(cell, r['stage'])} | "
                   f"{rec.get('wall_seconds') or ''} |")
    return "\n".join(out)


def table() -> str:
    head = ("| preset [stage] | slice | fits | GiB per chip / HBM | mesh, remat | step s "
            "(estimate) | tokens/s per chip (estimate) | MFU (estimate) | before the fix: GiB, "
            "tokens/s | preflight wall s |\n"
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    return head + "\n" + "\n".join(_row(c) for c in all_cells())


def write_section(intro: str) -> None:
    with open(MD) as f:
        text = f.read()
    i = text.find(HEADING)
    body = text if i < 0 else text[:i]
    with open(MD, "w") as f:
        f.write(body.rstrip("\n") + "\n\n" + HEADING + "\n\n" + intro.strip() + "\n\n"
                + table() + "\n")


INTRO_FILE = os.path.join(OUT, "intro.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="", help="comma list of PRESET@SLICE")
    ap.add_argument("--all", action="store_true", help="every cell without a JSON yet")
    ap.add_argument("--table", action="store_true",
                    help="rewrite the BENCHMARKS.md section from the JSON files (intro: "
                         "benchmarks/results/tpu/intro.md)")
    a = ap.parse_args()
    todo = [c for c in a.cells.split(",") if c] or (all_cells() if a.all else [])
    for cell in todo:
        if os.path.exists(cell_path(cell)):
            continue
        print(f"=== {cell}", flush=True)
        run_cell(cell)
    if a.table:
        with open(INTRO_FILE) as f:
            write_section(f.read())


if __name__ == "__main__":
    main()
