"""Roofline bounds for the speed goals of BENCHMARKS.md on *this* machine: the fastest any
implementation could run each workload, from the matmul rate and memory bandwidth measured in
this run, set against the baseline figures measured by the other benchmark scripts.

    python benchmarks/roofline.py [--train_json benchmarks/results/cpu/train_step.json]
                                  [--generate_json benchmarks/results/cpu/generate.json]
                                  [--bbq_dir data/bbq] [--json out.json]

Measured here (best of ``--reps``, float32):
* dense matmul rate: a jitted ``N x N x N`` matmul (``--matmul_n``) and ``torch.mm`` of the same
  size; the larger of the two is used, so the bounds are generous to the implementation;
* memory read bandwidth: a jitted sum over a 512 MiB array, and ``numpy.sum`` of it (larger used).

Workloads (SmolLM2-135M-Instruct, its config read from the shipped GGUF):
* **SFT step** (``train_step.py``'s batch: rows x seq, ``loss_tokens`` from its JSON): the FLOPs
  this project's step executes (layer matmuls on every slot, forward and activation gradients,
  plus weight gradients for full fine-tuning; attention over the causal query chunks
  ``model.attention_chunk``; the LM head on ``ceil(loss_tokens / loss_chunk) * loss_chunk``
  positions).  Bound = FLOPs / rate.  "2x torch" needs a step of torch_s / 2, i.e. a sustained
  rate of FLOPs / (torch_s / 2): printed as a fraction of the best measured matmul rate.
* **Generation** (``generate.py``'s batch, prompt and new tokens): a decode step must read every
  weight once (float32; the tied embedding once) and the KV cache; bound = max(bytes / bandwidth,
  FLOPs / rate) per step; tokens/s bound = batch / step bound, set against the transformers
  figure of the same run.
* **BBQ log-likelihood** (all items of ``--bbq_dir``): real tokens of the prefix-tree plan
  (:func:`regift_jax.eval.loglik.plan_prefix`; padding not counted) x the per-token forward
  FLOPs, plus the LM head on every continuation token; bound = FLOPs / rate, against 10 minutes.

A ratio bound below the goal means no implementation reaches the goal on this machine in float32
with this workload; the goal then needs other hardware (the one-GPU script) or a different
workload, and BENCHMARKS.md says so.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def log(msg):
    print(msg, flush=True)


def best_time(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_machine(n: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from regift_jax.training.metrics import measure_matmul_flops
    from train_step import measure_torch_matmul  # benchmarks/ is on sys.path (script dir)
    jax_flops, torch_flops = measure_matmul_flops(n, reps), measure_torch_matmul(n, reps)
    big = jnp.ones((128 * 2 ** 20,), jnp.float32)  # 512 MiB
    s = jax.jit(jnp.sum)
    t_sum = best_time(lambda: s(big).block_until_ready(), reps)
    nb = np.ones((128 * 2 ** 20,), np.float32)
    t_np = best_time(lambda: nb.sum(), reps)
    nbytes = 4.0 * 128 * 2 ** 20
    return {"matmul_n": n, "jax_matmul_flops": jax_flops, "torch_mm_flops": torch_flops,
            "rate": max(jax_flops, torch_flops),
            "jax_sum_bytes_per_s": nbytes / t_sum, "numpy_sum_bytes_per_s": nbytes / t_np,
            "bandwidth": max(nbytes / t_sum, nbytes / t_np)}


def model_cfg():
    import gguf
    from regift_jax.models.checkpoints import gguf_hf_config
    from regift_jax.models.config import ModelConfig
    from regift_jax.models.tokenizer import smollm2_gguf_path
    return ModelConfig.from_hf_config(gguf_hf_config(gguf.GGUFReader(smollm2_gguf_path())))


def layer_params(cfg) -> int:
    D, H, KV, hd, F = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size)
    return cfg.num_layers * (2 * D * H * hd + 2 * D * KV * hd + 3 * D * F)


def causal_scores(T: int, chunk: int) -> int:
    """Score entries per head and row computed with causal query chunks of ``chunk``."""
    if not chunk or T <= chunk:
        return T * T
    return sum(min(q0 + chunk, T) * min(chunk, T - q0) for q0 in range(0, T, chunk))


def sft_flops(cfg, rows: int, seq: int, loss_tokens: int, loss_chunk: int, attention_chunk: int,
              full: bool, lora_rank: int = 16, lora_targets=("q_proj", "v_proj")) -> dict:
    slots = rows * seq
    P = layer_params(cfg)
    D, V, hd, H, L = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_heads, cfg.num_layers
    head_rows = (math.ceil(loss_tokens / loss_chunk) * loss_chunk) if loss_chunk else slots
    attn_fwd = 4.0 * hd * H * causal_scores(seq, attention_chunk) * rows * L
    fwd = 2.0 * P * slots + attn_fwd + 2.0 * D * V * head_rows
    dx = 2.0 * P * slots + 2.0 * attn_fwd + 2.0 * D * V * head_rows
    if full:
        dw = 2.0 * P * slots + 2.0 * D * V * head_rows
    else:
        outs = {"q_proj": H * hd, "k_proj": cfg.num_kv_heads * hd, "v_proj": cfg.num_kv_heads * hd}
        n_lora = sum(lora_rank * (D + outs[t]) for t in lora_targets) * L
        dw = 2.0 * n_lora * slots  # weight gradients of the adapters only (their dx ~ as much)
        fwd += 2.0 * n_lora * slots
        dx += 2.0 * n_lora * slots
    return {"forward": fwd, "backward": dx + dw, "total": fwd + dx + dw, "head_rows": head_rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train_json", default=os.path.join(REPO, "benchmarks/results/cpu/train_step.json"))
    ap.add_argument("--generate_json", default=os.path.join(REPO, "benchmarks/results/cpu/generate.json"))
    ap.add_argument("--bbq_dir", default=os.path.join(REPO, "data", "bbq"))
    ap.add_argument("--loss_chunk", type=int, default=-1, help="-1: the trainer's default")
    ap.add_argument("--attention_chunk", type=int, default=-1, help="-1: the trainer's default")
    ap.add_argument("--matmul_n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    from regift_jax.core import configs_util
    base = configs_util.base_config()
    loss_chunk = int(base.model.loss_chunk) if a.loss_chunk < 0 else a.loss_chunk
    attention_chunk = (int(base.model.attention_chunk) if a.attention_chunk < 0
                       else a.attention_chunk)
    m = measure_machine(a.matmul_n, a.reps)
    rate, bw = m["rate"], m["bandwidth"]
    log(f"machine: dense float32 matmul {m['jax_matmul_flops'] / 1e9:.1f} GFLOP/s (jax) / "
        f"{m['torch_mm_flops'] / 1e9:.1f} (torch.mm); read bandwidth "
        f"{m['jax_sum_bytes_per_s'] / 1e9:.1f} GB/s (jax) / {m['numpy_sum_bytes_per_s'] / 1e9:.1f} "
        f"(numpy); bounds use {rate / 1e9:.1f} GFLOP/s and {bw / 1e9:.1f} GB/s; "
        f"load {os.getloadavg()[0]:.2f}")
    cfg = model_cfg()
    P = layer_params(cfg)
    n_params = P + cfg.vocab_size * cfg.hidden_size + (0 if cfg.tie_word_embeddings
                                                       else cfg.vocab_size * cfg.hidden_size)
    res = {"machine": m, "loss_chunk": loss_chunk, "attention_chunk": attention_chunk,
           "layer_params": P, "params": n_params}

    # ------------------------------------------------------------------ SFT step
    if os.path.exists(a.train_json):
        tj = json.load(open(a.train_json))
        rows, seq = tj["args"]["batch"], tj["args"]["seq"]
        res["sft"] = {}
        for kind, cfgs in tj["configs"].items():
            f = sft_flops(cfg, rows, seq, tj["loss_tokens"], loss_chunk, attention_chunk,
                          full=(kind == "full"))
            torch_s = cfgs["torch"]["mean_step_s"]
            ours_s = cfgs["ours"]["mean_step_s"]
            bound_s = f["total"] / rate
            need = f["total"] / (torch_s / 2.0) / rate
            r = {"flops": f["total"], "bound_s": bound_s, "ours_s": ours_s, "torch_s": torch_s,
                 "max_ratio": torch_s / bound_s, "rate_needed_for_2x": need,
                 "ours_fraction_of_rate": f["total"] / ours_s / rate}
            res["sft"][kind] = r
            log(f"SFT {kind} {rows}x{seq} ({tj['loss_tokens']} loss tokens, head on "
                f"{f['head_rows']} rows): {f['total'] / 1e12:.2f} TFLOP executed -> bound "
                f"{bound_s:.1f} s/step; ours measured {ours_s:.1f} s ({r['ours_fraction_of_rate']:.0%}"
                f" of the rate), torch {torch_s:.1f} s: ratio bound {r['max_ratio']:.2f}x; 2x needs "
                f"{need:.0%} of the best matmul rate sustained over the whole step")
    else:
        log(f"(no {a.train_json}: SFT bound skipped)")

    # ------------------------------------------------------------------ generation
    if os.path.exists(a.generate_json):
        gj = json.load(open(a.generate_json))
        B, new = gj["batch"], gj["new_tokens"]
        ctx = float(np.mean(gj["prompt_tokens"])) + new / 2.0
        kv_bytes = 2.0 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * B * 4
        w_bytes = 4.0 * n_params
        step_flops = B * (2.0 * n_params + 4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers
                          * ctx)
        step_s = max((w_bytes + kv_bytes) / bw, step_flops / rate)
        tps = B / step_s
        hf = gj["transformers_tokens_per_s"]
        res["generate"] = {"batch": B, "bound_tokens_per_s": tps, "weight_bytes": w_bytes,
                           "transformers_tokens_per_s": hf, "ours_tokens_per_s":
                           gj["regift_jax_tokens_per_s"], "max_ratio": tps / hf}
        log(f"generation batch {B}: a step reads {w_bytes / 1e6:.0f} MB of weights + "
            f"{kv_bytes / 1e6:.1f} MB of cache -> >= {step_s * 1e3:.1f} ms/step, <= {tps:.0f} "
            f"tokens/s; transformers measured {hf} tokens/s (ours {gj['regift_jax_tokens_per_s']}): "
            f"ratio bound {tps / hf:.1f}x (goal 10x)")
    else:
        log(f"(no {a.generate_json}: generation bound skipped)")

    # ------------------------------------------------------------------ BBQ
    if os.path.isdir(a.bbq_dir):
        from regift_jax.data import bbq
        from regift_jax.eval import loglik
        from regift_jax.models.tokenizer import load_tokenizer
        cats = [c for c in bbq.CATEGORIES if os.path.exists(bbq.bbq_path(a.bbq_dir, c))]
        items = bbq.load_bbq(a.bbq_dir, cats)
        flat = [it for c in cats for it in items[c]]
        tok = load_tokenizer()  # SmolLM2's, from the shipped GGUF
        reqs, _, _ = loglik.bbq_requests(flat, "bbq_base", tok)
        plan = loglik.plan_prefix(reqs)
        head_pos = sum(len(c) for r in reqs for c in r.continuations)
        flops = 2.0 * P * plan.tokens_real + 2.0 * cfg.vocab_size * cfg.hidden_size * head_pos
        bound_s = flops / rate
        res["bbq"] = {"items": len(flat), "tokens_real": plan.tokens_real, "head_positions":
                      head_pos, "flops": flops, "bound_s": bound_s, "goal_s": 600.0,
                      "rate_needed_for_goal": flops / 600.0}
        log(f"BBQ loglik, {len(flat)} items: {plan.tokens_real:,} real tokens "
            f"({plan.tokens_real / len(flat):.1f}/item, padding not counted) + LM head on "
            f"{head_pos:,} option tokens = {flops / 1e12:.1f} TFLOP -> >= {bound_s / 60:.1f} min "
            f"at the best rate (goal 10 min needs {flops / 600 / 1e9:.0f} GFLOP/s sustained)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
