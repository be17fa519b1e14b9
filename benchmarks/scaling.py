"""Train-step time vs number of (simulated) devices and model width: the cost of FSDP sharding.

    python benchmarks/scaling.py                  # --devices 1,2,4,8 --widths 1,2,4 --layers 2
                                                  # --batch 8 --seq 32 --steps 3 --warmup 0
                                                  # --out benchmarks/results/scaling

(``--seq`` defaults to 32, not 128: on 2 cores shared with other jobs the x1 step alone took 5.9 s
at 1 device with 128 tokens, and with 64 the 1-device column alone took 4.5 min (x4: 21 s per
step), putting the whole grid at ~30 min.  32 keeps it near 10-15 min.  Few tokens per step make
the fixed per-step costs -- optimizer update, collectives -- a larger share than in real
training, so the overhead ratios here are on the pessimistic side.)

READ THIS FIRST: the devices are *simulated* CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) that all share the same physical cores
(2 on the machine this was written on).  Splitting the same work over more of them cannot make it
faster; what the numbers show is the **overhead** of sharding -- the all-gathers of FSDP-sharded
parameters, the reduce-scatters of gradients, the extra per-device ops and their scheduling --
i.e. how the step cost *grows* with the device count, not a speed-up.  A ratio of 1.0 vs one
device would mean sharding is free.

What is measured
----------------
* Model: a Llama-shaped decoder derived from the SmolLM2-135M preset
  (:data:`regift_jax.models.presets.SMOLLM2_135M_INSTRUCT`, through ``ModelConfig``) with
  ``hidden_size``, ``intermediate_size``, ``num_heads`` and ``num_kv_heads`` multiplied by the
  width factor (``head_dim`` 64 kept), ``--layers`` layers (few, so that the grid runs in minutes),
  vocabulary 49,152 with tied embeddings, random init, float32 parameters and compute.
* Step: full fine-tuning with the project's real step,
  :func:`regift_jax.training.step.train_step` with :func:`regift_jax.training.optim.make_optimizer`
  (the default ``optim`` config: global-norm clip + AdamW with its decay mask), jitted the way
  :func:`regift_jax.training.loop.run` does it: explicit in/out shardings, the train state
  donated, optimizer state sharded like the parameters (``optax.tree_map_params``).
* Placement: :func:`regift_jax.core.sharding.make_mesh` with ``fsdp=N`` (``--mesh data`` gives
  ``data=N`` instead; ``--mesh fsdp,data`` runs both),
  :data:`~regift_jax.core.sharding.DEFAULT_RULES`,
  :func:`~regift_jax.models.decoder.param_shardings` (parameters initialised directly into them) and
  :func:`~regift_jax.core.sharding.batch_sharding` (batch assembled with
  :func:`regift_jax.data.pipeline.make_global_array`).  The *global* batch is the same for every
  N: ``--batch`` rows of ``--seq`` random tokens, every token a loss token.
* Timing: one call that compiles and runs a first step (its time is reported separately as
  ``first_call_s``; it is the warm-up), ``--warmup`` more untimed steps (default 0), then
  ``--steps`` timed steps, each waited for (``block_until_ready``); the median is reported, with
  tokens/s (``batch * seq / median``) and the process CPU seconds per step (a second table: on a
  shared machine the wall times move with the other jobs' load, CPU seconds much less).  The
  same batch is fed every step, so the loss drops towards 0 (memorisation); irrelevant for timing.

Each device count runs in its own subprocess (the XLA flag must be set before jax is imported);
the load average is recorded before and after each, since the machine may be shared.

Output: a Markdown table (step time per device count and the ratio vs 1 device), and under
``--out``: ``scaling.json`` (every measurement and the settings) and ``scaling.png`` (step time vs
device count, one line per width, log y).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CAVEAT = ("NOTE: the N devices are simulated CPU devices sharing the same {cores} physical "
          "core(s); more devices cannot be faster here. The table shows the overhead of "
          "sharding/collectives (cost growth vs 1 device), not a speed-up.")


def load_avg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def width_config(width: int, layers: int):
    """SmolLM2-135M's architecture with the width scaled by ``width`` (head_dim kept); it runs
    with the default ``RunConfig`` (float32, no remat)."""
    from regift_jax.models.presets import get_preset
    base = get_preset("smollm2-135m-instruct").model_config()
    return base.replace(
        hidden_size=base.hidden_size * width,
        intermediate_size=base.intermediate_size * width,
        num_heads=base.num_heads * width, num_kv_heads=base.num_kv_heads * width,
        num_layers=layers, name=f"smollm2-135m-x{width}-{layers}L")


def mesh_shape(mode: str, n: int) -> dict:
    return {"data": n if mode == "data" else 1, "fsdp": n if mode == "fsdp" else 1, "tensor": 1}


# ================================================================================ worker
def worker(args) -> dict:
    """Runs in a subprocess whose XLA_FLAGS fixed the device count; returns the measurements."""
    import jax
    import numpy as np

    from regift_jax.core import sharding as shd
    from regift_jax.core.configs_util import base_config
    from regift_jax.data.pipeline import make_global_array
    from regift_jax.models.decoder import init_params, param_shardings
    from regift_jax.training.optim import make_optimizer
    from regift_jax.training.state import init_state, state_shardings
    from regift_jax.training.step import jit_train_step

    n = jax.device_count()
    if n != args.worker:
        raise SystemExit(f"expected {args.worker} devices, jax sees {n} ({jax.devices()})")
    out = []
    B, T = args.batch, args.seq
    for mode in args.mesh.split(","):
        mesh = shd.make_mesh(mesh_shape(mode, n))
        rules = shd.DEFAULT_RULES
        batch_sh = shd.batch_sharding(mesh, rules)
        for width in [int(w) for w in args.widths.split(",")]:
            cfg = width_config(width, args.layers)
            t0 = time.perf_counter()
            # --- placement as in loop.run(): params on their logical-axis shardings,
            # optimizer state sharded like the params it mirrors, scalars replicated.
            p_sh = param_shardings(cfg, mesh, rules)
            params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(0)),
                             out_shardings=p_sh)()
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
            ocfg = base_config().optim
            ocfg.warmup_steps = 0  # a real (non-zero lr) update from the first step
            tx, schedule = make_optimizer(ocfg, 1000, params)
            state_sh, _ = state_shardings(tx, params, p_sh, mesh)
            state = init_state(tx, params, state_sh, seed=0)
            del params
            step_fn = jit_train_step(cfg, tx, schedule, state_sh, {}, batch_sh)
            # --- a fixed random batch, every token a loss token
            rng = np.random.default_rng(0)
            toks = rng.integers(3, cfg.vocab_size, size=(B, T + 1), dtype=np.int32)
            host = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                    "loss_mask": np.ones((B, T), np.int32),
                    "segment_ids": np.ones((B, T), np.int32),
                    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
            batch = make_global_array(host, mesh, batch_sh.spec[0])
            setup_s = time.perf_counter() - t0
            # --- compile (first call), warm-up, timed steps
            t0 = time.perf_counter()
            state, m = step_fn(state, {}, batch)
            jax.block_until_ready((state, m))
            first_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                state, m = step_fn(state, {}, batch)
                jax.block_until_ready((state, m))
            times, cpu = [], []
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                state, m = step_fn(state, {}, batch)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            m = jax.device_get(m)
            med = statistics.median(times)
            rec = {"mode": mode, "devices": n, "mesh": dict(mesh.shape), "width": width,
                   "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                   "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                   "params": n_params, "params_config": cfg.num_params(),
                   "param_spec_embed": str(p_sh["embed_tokens"].spec),
                   "step_s_median": med, "step_s_all": times, "cpu_s_per_step": cpu,
                   "tokens_per_s": B * T / med, "first_call_s": first_s, "setup_s": setup_s,
                   "loss": float(m["loss"]), "finite": bool(m["finite"]),
                   "load_avg_after": load_avg()}
            print(f"[{n} dev, {mode}, x{width}] {n_params / 1e6:.1f}M params: first call "
                  f"{first_s:.1f} s, step {med * 1e3:.0f} ms (all {[round(t * 1e3) for t in times]}"
                  f"), {rec['tokens_per_s']:.0f} tok/s, loss {rec['loss']:.3f}",
                  file=sys.stderr, flush=True)
            out.append(rec)
            del state, step_fn, batch
    return {"devices": n, "results": out}


# ================================================================================ driver
def run_worker(n: int, args) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n),
           "--widths", args.widths, "--layers", str(args.layers), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--mesh", args.mesh]
    load_before = load_avg()
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"worker for {n} devices failed (rc {r.returncode})")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(load_avg_before=load_before, load_avg_after=load_avg(),
               wall_s=round(time.time() - t0, 1))
    return res


def tables(results, devices, widths, modes):
    by = {(r["mode"], r["width"], r["devices"]): r for r in results}
    lines = []
    for mode in modes:
        if len(modes) > 1:
            lines.append(f"\nmesh: {mode}=N")
        head = ["width", "params"] + [f"{n} dev ms" for n in devices] + \
            [f"{n}/1" for n in devices if n != devices[0]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for w in widths:
            row = by.get((mode, w, devices[0]))
            params = row["params"] if row else None
            base = row["step_s_median"] if row else None
            cells = [f"x{w}", f"{params / 1e6:.1f}M" if params else "?"]
            for n in devices:
                r = by.get((mode, w, n))
                cells.append(f"{r['step_s_median'] * 1e3:.0f}" if r else "-")
            for n in devices[1:]:
                r = by.get((mode, w, n))
                cells.append(f"{r['step_s_median'] / base:.2f}x" if r and base else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("process CPU seconds per step (median; less sensitive than wall time to other "
                     "jobs on the machine, but counts every thread, spinning included):")
        lines.append("| width | " + " | ".join(f"{n} dev" for n in devices) + " | " +
                     " | ".join(f"{n}/1" for n in devices[1:]) + " |")
        lines.append("|---|" + "|".join(["---:"] * (2 * len(devices) - 1)) + "|")
        for w in widths:
            cpu = {n: statistics.median(by[(mode, w, n)]["cpu_s_per_step"])
                   for n in devices if (mode, w, n) in by}
            cells = [f"x{w}"] + [f"{cpu[n]:.2f}" if n in cpu else "-" for n in devices]
            cells += [f"{cpu[n] / cpu[devices[0]]:.2f}x" if n in cpu and devices[0] in cpu
                      else "-" for n in devices[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("tokens/s (global batch / median step time):")
        lines.append("| width | " + " | ".join(f"{n} dev" for n in devices) + " |")
        lines.append("|---|" + "|".join(["---:"] * len(devices)) + "|")
        for w in widths:
            cells = [f"x{w}"]
            for n in devices:
                r = by.get((mode, w, n))
                cells.append(f"{r['tokens_per_s']:.0f}" if r else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, devices, widths, modes, path, cores):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for mode in modes:
        for w in widths:
            pts = sorted((r["devices"], r["step_s_median"] * 1e3) for r in results
                         if r["mode"] == mode and r["width"] == w)
            if not pts:
                continue
            params = next(r["params"] for r in results if r["mode"] == mode and r["width"] == w)
            label = f"x{w} ({params / 1e6:.0f}M params)" + (f", {mode}" if len(modes) > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if mode == "fsdp" else "s--",
                    label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(devices)
    ax.set_xticklabels([str(n) for n in devices])
    ax.set_yscale("log")
    ax.set_xlabel("simulated CPU devices (mesh fsdp=N)" if modes == ["fsdp"] else
                  "simulated CPU devices")
    ax.set_ylabel("train step time, median (ms)")
    ax.set_title(f"Full fine-tuning train step vs devices\n(all devices share {cores} physical "
                 "cores: sharding overhead, not speed-up)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--widths", default="1,2,4")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows), same for every N")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed steps after the first (compiling, already executing) call")
    ap.add_argument("--mesh", default="fsdp", help="fsdp (fsdp=N), data (data=N) or fsdp,data")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "scaling"))
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    devices = sorted(int(d) for d in args.devices.split(","))
    widths = [int(w) for w in args.widths.split(",")]
    modes = args.mesh.split(",")
    bad = [m for m in modes if m not in ("fsdp", "data")]
    if bad:
        raise SystemExit(f"--mesh: unknown {bad}; use fsdp, data or fsdp,data")
    if any(args.batch % n for n in devices):
        raise SystemExit(f"--batch {args.batch} must be divisible by every device count {devices}")
    cores = n_cores()
    caveat = CAVEAT.format(cores=cores)
    print(caveat, flush=True)
    print(f"model: SmolLM2-135M shape x width {widths}, {args.layers} layers, float32; global "
          f"batch {args.batch} x {args.seq} tokens; mesh {modes}=N; median of {args.steps} steps "
          f"after the compiling call + {args.warmup} warm-up; load average before: {load_avg()}",
          flush=True)
    t0 = time.time()
    runs = []
    for n in devices:
        runs.append(run_worker(n, args))
        print(f"  {n} device(s) done in {runs[-1]['wall_s']:.0f} s; load average "
              f"{runs[-1]['load_avg_before']} -> {runs[-1]['load_avg_after']}", flush=True)
    results = [r for run in runs for r in run["results"]]
    table = tables(results, devices, widths, modes)
    print()
    print(table)
    print()
    print(caveat)
    os.makedirs(args.out, exist_ok=True)
    import jax
    summary = {
        "note": caveat, "command": " ".join([os.path.basename(sys.executable)] +
                                            [os.path.relpath(__file__, REPO)] +
                                            (argv if argv is not None else sys.argv[1:])),
        "settings": {"devices": devices, "widths": widths, "layers": args.layers,
                     "batch": args.batch, "seq": args.seq, "steps": args.steps,
                     "warmup": args.warmup, "mesh": modes,
                     "tokens_per_step": args.batch * args.seq, "dtype": "float32",
                     "base_model": "smollm2-135m-instruct", "physical_cores": cores,
                     "jax": jax.__version__},
        "wall_s": round(time.time() - t0, 1),
        "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
        "results": results, "table_markdown": table,
    }
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, devices, widths, modes, os.path.join(args.out, "scaling.png"), cores)
    print(f"wrote {os.path.join(args.out, 'scaling.json')} and scaling.png "
          f"(total {summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
