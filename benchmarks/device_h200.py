"""One-GPU benchmark: a Llama-3-8B-shaped model (random weights, bf16) on one H100/H200.

Run through ``benchmarks/device_h200.sh`` (it runs the two parts in separate processes so
that JAX's and PyTorch's allocators never share the card):

    python benchmarks/device_h200.py --part jax   --out DIR   # this project
    python benchmarks/device_h200.py --part torch --out DIR   # transformers + PEFT baseline
    python benchmarks/device_h200.py --part report --out DIR  # table from the two JSON files

What is measured (same shapes for both stacks):

* **peak**: a jitted 8192x8192x8192 bf16 matmul, median of 10 after 3 warm-ups — the ceiling
  MFU is computed against (measured in the same run, not a datasheet number).
* **SFT step, LoRA** (the paper's setup: r16, alpha 32, q_proj/v_proj, base weights frozen
  in bf16): ``regift_jax.training.step.train_step`` jitted with explicit in/out shardings and
  donation on an FSDP mesh of the one chip, remat ``full``, batch x 2048 tokens.  MFU uses
  :func:`regift_jax.training.metrics.train_flops_per_token` (LoRA: no weight-gradient FLOPs for
  frozen weights; attention counted in full).  Baseline: transformers ``LlamaForCausalLM`` + PEFT,
  gradient checkpointing, torch AdamW, SDPA attention, same batch.
* Attention and loss (``--attention_impl``, ``--loss_chunk``): by default the LoRA and full steps
  run attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash
  attention; the rows are unpadded, so only ``is_causal`` is passed) and the LM head + loss on
  chunks of 2,048 positions (``regift_jax.models.head_loss``: no [B, T, 128256] float32 logits).
  A second LoRA phase, ``train_lora_einsum``, repeats the step with the decoder's einsum attention
  and full logits (the path measured on 2026-11-28), so the gain of the two is attributed in the
  same run; if the cuDNN phase fails, its error is recorded and the einsum phase still reports.
* **SFT step, full fine-tuning** (bf16 params and bf16 AdamW moments; the 8B model in fp32 with
  fp32 moments does not fit one chip with activations).
* **generation**: batch 64, prompts of 128 random tokens, 128 new tokens, greedy, no early
  stop: this project's :class:`regift_jax.models.sampling.Sampler` vs transformers ``generate``
  (``min_new_tokens`` = ``max_new_tokens``), tokens/s counting new tokens only, prefill included.

``--smoke`` runs every part on a tiny model on the CPU (the path CI-free development uses to
check the script before spending device time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEQ = 2048
GEN_BATCH, GEN_PROMPT, GEN_NEW = 64, 128, 128


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_dims(smoke: bool) -> dict:
    """HF-style dims of the benchmarked model (Llama-3-8B shape, or tiny for --smoke)."""
    if smoke:
        return dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128)


@contextlib.contextmanager
def phase(args, part: str, res: dict, key: str):
    """One benchmark phase: an exception is printed and stored as ``res[key]["error"]`` so the
    other phases' figures survive; the results so far are written after every phase."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (any failure: keep the other figures)
        traceback.print_exc()
        res[key] = {"error": repr(e)[:500]}
    _dump(args, part, res)


def timed(fn, warmup: int, reps: int, sync):
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


# ============================================================================ JAX
def run_jax(args) -> dict:
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np

    from regift_jax.core import sharding as shd
    from regift_jax.models import lora as lora_lib
    from regift_jax.models.config import ModelConfig
    from regift_jax.models.decoder import init_params, param_shardings
    from regift_jax.models.run_config import NO_LORA, LoraConfig, RunConfig
    from regift_jax.models.sampling import Sampler, SamplingConfig
    from regift_jax.training.metrics import train_flops_per_token
    from regift_jax.training.optim import make_optimizer
    from regift_jax.training.state import init_state, split_trainable, state_shardings
    from regift_jax.training.step import jit_train_step

    res = {"stack": "regift_jax", "jax": jax.__version__,
           "device": str(jax.devices()[0].device_kind), "n_devices": jax.device_count()}
    log(f"jax {jax.__version__} on {res['device']}")
    block = lambda x: jax.block_until_ready(x)  # noqa: E731

    # ---- peak
    n = 1024 if args.smoke else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    t, _ = timed(lambda: mm(a, b), 3, 10, block)
    peak = 2.0 * n ** 3 / t
    res["peak_flops"] = peak
    log(f"peak: {n}^3 bf16 matmul {t * 1e3:.2f} ms -> {peak / 1e12:.1f} TFLOP/s")
    a = b = None  # free the matmul operands

    d = model_dims(args.smoke)
    cfg = ModelConfig(family="llama", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                      intermediate_size=d["intermediate_size"],
                      num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                      num_kv_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
                      rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, name="llama3-8b-shaped (random)")
    run = RunConfig(param_dtype="bfloat16", dtype="bfloat16", remat_policy="full")
    impl = "xla" if (args.smoke and args.attention_impl == "cudnn") else args.attention_impl
    fast = dict(attention_impl=impl, loss_chunk=args.loss_chunk)
    res["attention_impl"], res["loss_chunk"] = impl, args.loss_chunk
    res["n_params"] = cfg.num_params()
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    full_sh = param_shardings(cfg, mesh, run=run)
    t0 = time.perf_counter()
    params = jax.jit(lambda k: init_params(cfg, k, run=run),
                     out_shardings=full_sh)(jax.random.PRNGKey(0))
    block(params)
    log(f"init {res['n_params'] / 1e9:.2f}B params (bf16) in {time.perf_counter() - t0:.1f}s")

    B, T = args.batch, (128 if args.smoke else SEQ)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(B, T + 1), dtype=np.int32)
    bsh = shd.batch_sharding(mesh)
    # Unpacked, unpadded rows: no positions / segment ids, so the decoder passes only
    # is_causal to dot_product_attention (the trainer's batches carry them when packed).
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
             "loss_mask": np.ones((B, T), np.int32)}
    batch = {k: jax.device_put(v, bsh) for k, v in batch.items()}
    ocfg = types.SimpleNamespace(learning_rate=1e-5, schedule="constant", warmup_steps=0,
                                 warmup_fraction=0.0, end_lr_fraction=0.0, clip_norm=1.0,
                                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, no_decay=())

    def bench_train(mrun, mlora, trainable, frozen, trainable_sh, frozen_sh, label, n_lora):
        tx, schedule = make_optimizer(ocfg, 100, trainable)
        state_sh, _ = state_shardings(tx, trainable, trainable_sh, mesh)
        state = init_state(tx, trainable, state_sh, seed=0)
        step = jit_train_step(cfg, tx, schedule, state_sh, frozen_sh, bsh, run=mrun, lora=mlora)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        log(f"{label}: compiled in {time.perf_counter() - t0:.1f}s")
        box = {"s": state}
        losses = []

        def one():
            box["s"], m = compiled(box["s"], frozen, batch)
            return m

        def sync(m):
            losses.append(float(m["loss"]))
        t, ts = timed(one, 2, args.steps, sync)
        tok_s = B * T / t
        flops_tok = train_flops_per_token(cfg, T, n_lora)
        out = {"step_s": t, "steps_s": ts, "tokens_per_s": tok_s,
               "flops_per_token": flops_tok, "mfu": flops_tok * tok_s / peak,
               "loss_first": losses[0], "loss_last": losses[-1],
               "batch": B, "seq": T}
        log(f"{label}: step {t * 1e3:.0f} ms, {tok_s:,.0f} tok/s, MFU {out['mfu']:.1%} "
            f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})")
        box.clear()
        return out

    # ---- LoRA SFT step (paper setup): fast paths, then the einsum / full-logits control
    lora = LoraConfig(rank=16, alpha=32.0, dropout=0.05, targets=("q_proj", "v_proj"))
    lparams = lora_lib.add_lora(cfg, lora, params, seed=0, mesh=mesh)
    trainable, frozen, tsh, fsh = split_trainable(cfg, lora, lparams, mesh, run=run)
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    for key, over in (("train_lora", fast),
                      ("train_lora_einsum", dict(attention_impl="einsum", loss_chunk=0))):
        if key == "train_lora_einsum" and args.no_control:
            continue
        with phase(args, "jax", res, key):
            # a copy per phase: the jitted step donates the state built from it
            res[key] = bench_train(run.replace(**over), lora, jax.tree.map(jnp.copy, trainable),
                                   frozen, tsh, fsh, f"LoRA r16 q,v {over}", n_lora)
            res[key].update(trainable_params=n_lora, **over)
    del trainable, frozen, lparams

    # ---- generation
    with phase(args, "jax", res, "generate"):
        sampler = Sampler(cfg, params, tokenizer=None, mesh=mesh, batch_size=GEN_BATCH,
                          length_bucket=GEN_PROMPT, chunk=32, eos_ids=(-1,),
                          cache_len=GEN_PROMPT + GEN_NEW, run=run.replace(remat_policy="none"))
        prompts = [list(map(int, r)) for r in
                   rng.integers(3, cfg.vocab_size, size=(GEN_BATCH, GEN_PROMPT))]
        sc = SamplingConfig(max_new_tokens=GEN_NEW, temperature=0.0)
        t0 = time.perf_counter()
        sampler.generate(prompts, sc)
        log(f"generation: first call (compile) {time.perf_counter() - t0:.1f}s")
        t, ts = timed(lambda: sampler.generate(prompts, sc), 0, 3, lambda g: g)
        gens = sampler.generate(prompts, sc)
        assert all(g.generated_tokens == GEN_NEW for g in gens), "early stop in benchmark"
        res["generate"] = {"s": t, "runs_s": ts, "tokens_per_s": GEN_BATCH * GEN_NEW / t,
                           "batch": GEN_BATCH, "prompt": GEN_PROMPT, "new": GEN_NEW,
                           "first_row": [int(x) for x in gens[0].token_ids[:8]]}
        log(f"generation: {GEN_BATCH}x{GEN_NEW} new tokens in {t:.2f}s -> "
            f"{res['generate']['tokens_per_s']:,.0f} tok/s")

    # ---- full fine-tuning (bf16 params and moments)
    if not args.skip_full:
        with phase(args, "jax", res, "train_full"):
            res["train_full"] = bench_train(run.replace(**fast), NO_LORA, params, {}, full_sh, {},
                                            f"full FT {fast}", 0)
            res["train_full"].update(fast)
    return res


# ============================================================================ PyTorch baseline
def run_torch(args) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cpu" if args.smoke else "cuda"
    res = {"stack": "transformers+peft", "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import peft
        res["peft"] = peft.__version__
    except ImportError:
        peft = None
    sync = (lambda x: torch.cuda.synchronize()) if dev == "cuda" else (lambda x: x)
    d = model_dims(args.smoke)
    hf = LlamaConfig(**d, max_position_embeddings=8192, rope_theta=500000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(hf).to(torch.bfloat16)
    model.eval()
    log(f"torch {torch.__version__}: model built in {time.perf_counter() - t0:.1f}s")
    B, T = args.batch, (128 if args.smoke else SEQ)
    g = torch.Generator().manual_seed(0)

    # ---- generation
    with phase(args, "torch", res, "generate"):
        ids = torch.randint(3, d["vocab_size"], (GEN_BATCH, GEN_PROMPT), generator=g).to(dev)
        att = torch.ones_like(ids)
        kw = dict(do_sample=False, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                  pad_token_id=0, attention_mask=att)
        with torch.no_grad():
            # a full-length warm-up: on the H200 (2026-11-28) a warm-up of 8 tokens left the
            # first full run 2.5x slower than the second (8.35 s vs 3.41 s)
            model.generate(ids, **kw)
            ts = []
            for _ in range(3):
                sync(None)
                t = time.perf_counter()
                out = model.generate(ids, **kw)
                sync(None)
                ts.append(time.perf_counter() - t)
        assert out.shape[1] == GEN_PROMPT + GEN_NEW
        t = statistics.median(ts)
        res["generate"] = {"s": t, "runs_s": ts, "tokens_per_s": GEN_BATCH * GEN_NEW / t}
        log(f"HF generate: {GEN_BATCH}x{GEN_NEW} in {t:.2f}s -> "
            f"{res['generate']['tokens_per_s']:,.0f} tok/s")

    # ---- LoRA SFT step
    with phase(args, "torch", res, "train_lora"):
        if peft is None:
            raise RuntimeError("peft is not installed")
        lm = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM"))
        lm.train()
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
        opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-5)
        x = torch.randint(3, d["vocab_size"], (B, T + 1), generator=g).to(dev)
        inp, lab = x[:, :-1], x[:, 1:].clone()
        losses = []

        def step():
            out = lm(input_ids=inp, use_cache=False)
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), lab.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t, ts = timed(step, 2, args.steps, lambda l_: (sync(None), losses.append(float(l_))))
        res["train_lora"] = {"step_s": t, "steps_s": ts, "tokens_per_s": B * T / t,
                             "loss_first": losses[0], "batch": B, "seq": T}
        log(f"PEFT LoRA: step {t * 1e3:.0f} ms, {B * T / t:,.0f} tok/s")
    return res


# ============================================================================ report
def _dump(args, part, res):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"device_{part}.json"), "w") as f:
        json.dump(res, f, indent=1)


def report(args) -> str:
    def load(p):
        path = os.path.join(args.out, f"device_{p}.json")
        return json.load(open(path)) if os.path.exists(path) else {}
    j, t = load("jax"), load("torch")

    def fig(r, k, f="tokens_per_s"):
        v = r.get(k, {})
        return v.get(f) if isinstance(v, dict) else None

    rows = [f"device: {j.get('device')} | jax {j.get('jax')} | torch {t.get('torch')} | "
            f"transformers {t.get('transformers')} | peft {t.get('peft')}",
            f"measured bf16 matmul peak: {(j.get('peak_flops') or 0) / 1e12:.1f} TFLOP/s; "
            f"model {(j.get('n_params') or 0) / 1e9:.2f}B params",
            "", "| what | regift_jax | transformers(+PEFT) | ratio | MFU (ours) |",
            "|---|---:|---:|---:|---:|"]
    lora_k = "train_lora" if fig(j, "train_lora") else "train_lora_einsum"
    for label, k in ((f"SFT LoRA r16 q,v tokens/s ({(j.get(lora_k) or {}).get('attention_impl')} "
                      f"attention, loss_chunk {(j.get(lora_k) or {}).get('loss_chunk')})", lora_k),
                     ("SFT full FT (bf16) tokens/s", "train_full"),
                     ("generation tokens/s (B=64, 128 new)", "generate")):
        a, b = fig(j, k), fig(t, "train_lora" if k == lora_k else k)
        mfu = fig(j, k, "mfu")
        rows.append(f"| {label} | {a if a is None else f'{a:,.0f}'} | "
                    f"{b if b is None else f'{b:,.0f}'} | "
                    f"{'-' if not (a and b) else f'{a / b:.2f}x'} | "
                    f"{'-' if mfu is None else f'{mfu:.1%}'} |")
    if lora_k == "train_lora" and fig(j, "train_lora_einsum"):
        a, e = fig(j, "train_lora"), fig(j, "train_lora_einsum")
        rows.append(f"| control: LoRA, einsum attention + full logits | {e:,.0f} | "
                    f"{fig(t, 'train_lora') or 0:,.0f} | fast/control {a / e:.2f}x | "
                    f"{fig(j, 'train_lora_einsum', 'mfu'):.1%} |")
    for r, name in ((j, "jax"), (t, "torch")):
        for k, v in r.items():
            if isinstance(v, dict) and "error" in v:
                rows.append(f"{name} {k}: ERROR {v['error']}")
    text = "\n".join(rows)
    with open(os.path.join(args.out, "device_report.md"), "w") as f:
        f.write(text + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("jax", "torch", "report"), required=True)
    ap.add_argument("--out", default="benchmarks/results/device")
    ap.add_argument("--batch", type=int, default=4, help="SFT rows of 2048 tokens")
    ap.add_argument("--steps", type=int, default=5, help="timed SFT steps (after 2 warm-up)")
    ap.add_argument("--skip_full", action="store_true", help="skip the full fine-tuning step")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (script check)")
    ap.add_argument("--attention_impl", default="cudnn", choices=("cudnn", "xla", "einsum"),
                    help="RunConfig.attention_impl of the SFT steps (--smoke: cudnn -> xla)")
    ap.add_argument("--loss_chunk", type=int, default=2048,
                    help="RunConfig.loss_chunk of the SFT steps (0: full logits)")
    ap.add_argument("--no_control", action="store_true",
                    help="skip the einsum / full-logits LoRA control phase")
    args = ap.parse_args()
    if args.part == "jax":
        run_jax(args)
    elif args.part == "torch":
        run_torch(args)
    else:
        print(report(args))


if __name__ == "__main__":
    main()
