"""SFT train-step throughput: this project's jitted step vs the paper's torch + transformers + PEFT.

    python benchmarks/train_step.py [--batch 8] [--seq 512] [--warmup 1] [--steps 2]
                                    [--configs lora,full] [--remat none] [--json out.json]
    python benchmarks/train_step.py --batch 2 --seq 128 --steps 2     # a quick check (~4 min)

The default (8 x 512, 1 warm-up + 2 timed steps, both configurations) took 13 min on the idle
2-core machine; peak memory ~15 GiB (one worker at a time).

One run, one machine, float32 parameters and float32 compute in both stacks, SmolLM2-135M-Instruct.

What is measured
----------------
* **Ours**: :func:`regift_jax.training.step.train_step` jitted exactly as
  :func:`regift_jax.training.loop.run` does (explicit shardings on the trainer's mesh, state
  donated), the optimizer from :func:`regift_jax.training.optim.make_optimizer`, the model from
  :func:`regift_jax.training.state.load_model` with the ``smollm2_135m`` preset of
  ``configs/llama.py`` (float32, ``remat_policy`` none, LoRA r16 alpha 32 dropout 0.05 on
  q_proj/v_proj).  The preset's lr schedule (cosine after warmup) is replaced by a constant lr
  without warmup so that both stacks take the same updates.
* **Baseline** (the paper's stack): ``transformers.LlamaForCausalLM.from_pretrained`` of our loaded
  weights exported with the project's exporter (:func:`regift_jax.training.state.export_model`),
  PEFT LoRA with the same r / alpha / dropout / targets (its ``lora_A`` set to our ``lora_a``,
  both ``lora_B`` start at 0), ``torch.optim.AdamW`` (default implementation) with the same lr,
  betas, eps, weight decay and no-decay groups, ``clip_grad_norm_`` 1.0 as the HF Trainer; loss
  from ``model(input_ids, attention_mask, labels)``.
* **Batch**: one batch of the shipped trace set through the project's pipeline with
  ``packing="none"`` (one example per row, right-padded; the HF model cannot attend within
  packed segments), reused for every step (with ``--seq`` shorter than every example, each row
  is the last ``--seq`` tokens of an example of a 1024-token batch).  Torch gets the same token
  ids, ``attention_mask`` = non-pad and ``labels`` = -100 except where our ``loss_mask`` is 1
  (shifted by one: HF shifts the labels itself).  tokens/s counts non-pad tokens; MFU is given
  per non-pad token (the brief's definition) and per row slot (the trainer's: padding is
  computed too).
* **Peak**: the best of ``--matmul_reps`` jitted float32 ``n x n`` matmuls (``--matmul_n``),
  measured in the same run; torch's float32 matmul is measured too, for information.
* FLOPs per token: :func:`regift_jax.training.metrics.train_flops_per_token` (``6N + 12 L H hd
  T``; with LoRA the frozen weights' gradients ``2 N`` are not computed, ``6 N_lora`` is added).
  The same figure is used for the baseline's MFU.

Each stack of each configuration runs in its own worker process (this file, ``--worker``), so
neither stack's retained heap or spinning thread pool weighs on the other.  ``--order
sequential`` (default): ours, then torch, one worker alive at a time; ``--order interleaved``:
both alive and the timed steps alternate so both see the same load, but needs the memory of both
steps at once.  The first ``--warmup`` steps are untimed (ours: compilation; torch: allocator
warm-up); each of the next ``--steps`` is timed on its own, wall and process CPU seconds (ours:
until its loss is on the host).  ``--breakdown`` also times the forward alone and forward +
backward alone.  The machine may be shared: load averages are printed, and a WARNING when it was
busy (another process on one of the cores slows both stacks several-fold).

Results and their history: ``BENCHMARKS.md``.
"""

import argparse
import functools
import gc
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load_avg() -> str:
    try:
        a = os.getloadavg()
        return f"load {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load unavailable"


def rss_gib() -> str:
    cur = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return f"RSS {cur:.1f} GiB (peak so far {peak:.1f} GiB)"


def others_busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes over ``seconds`` (from /proc/stat; this process idles)."""
    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # all but idle and iowait
    try:
        b0, t0 = busy()
        time.sleep(seconds)
        b1, t1 = busy()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


class Timer:
    """Wall and process CPU seconds of a phase."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


# ============================================================================ setup
def preset_config(args, kind: str):
    """The smollm2_135m preset of configs/llama.py with the benchmark's overrides."""
    from configs import llama
    c = llama.get_config("smollm2_135m")
    # The JSONL shards behind the default TFDS source (the same examples, tested): no TensorFlow
    # in a process that times JAX against torch.
    c.data.source = "data/traces"
    c.data.seq_len = args.seq
    c.data.packing = "none"
    c.model.remat_policy = args.remat
    if args.attention_chunk >= 0:
        c.model.attention_chunk = args.attention_chunk
    if args.loss_chunk >= 0:
        c.model.loss_chunk = args.loss_chunk
    c.lora.enabled = kind == "lora"
    c.lora.dropout = args.lora_dropout
    c.optim.schedule = "constant"  # both stacks: same lr at every step
    c.optim.warmup_steps = 0
    if kind == "full":
        c.optim.learning_rate = args.full_lr
    return c


def _pipeline_batch(args, tokenizer, seq_len: int):
    from regift_jax.training import examples, inputs
    c = preset_config(args, "lora")
    c.data.seq_len = seq_len
    train_ex, _, _ = examples.train_and_eval_examples(c.data)
    render, template_id = inputs.make_render(c.data, tokenizer)
    pipe = inputs.make_pipeline(train_ex, tokenizer, render, c.data, global_batch=args.batch,
                                seed=args.seed, num_epochs=None, shuffle=False, prefetch=0)
    try:
        return {k: np.array(v) for k, v in next(pipe).items()}, template_id
    finally:
        pipe.close()


def make_batch(args, tokenizer):
    """One [B, T] batch of the trace set (packing none); numpy dict of the pipeline's fields."""
    try:
        batch, template_id = _pipeline_batch(args, tokenizer, args.seq)
    except ValueError as e:  # --seq shorter than every example (prompt included)
        long_len = 1024
        log(f"  note: no example fits in {args.seq} tokens ({str(e)[:80]}...): rows are the last "
            f"{args.seq} tokens of each example of a {long_len}-token batch (positions from 0)")
        full, template_id = _pipeline_batch(args, tokenizer, long_len)
        batch = {k: np.zeros((args.batch, args.seq), v.dtype) for k, v in full.items()}
        for r in range(args.batch):
            n = int((full["segment_ids"][r] != 0).sum())
            lo = max(0, n - args.seq)
            m = n - lo
            for k in ("inputs", "targets", "loss_mask", "segment_ids"):
                batch[k][r, :m] = full[k][r, lo:n]
            batch["positions"][r, :m] = np.arange(m)
            if m < args.seq:
                batch["inputs"][r, m:] = full["inputs"][r, n]  # the pipeline's pad id
    if batch["loss_mask"][:, -1].any():
        # HF shifts labels inside the model, so the last slot's target cannot be given to it.
        n = int(batch["loss_mask"][:, -1].sum())
        log(f"  note: {n} row(s) have a loss token in the last slot; masked in both stacks")
        batch["loss_mask"][:, -1] = 0
    return batch, template_id


def torch_labels(batch) -> np.ndarray:
    """HF labels: labels[t + 1] = targets[t] where loss_mask[t] (HF predicts labels[t+1] from
    logits[t]); -100 elsewhere."""
    lab = np.full(batch["inputs"].shape, -100, np.int64)
    lab[:, 1:] = np.where(batch["loss_mask"][:, :-1] == 1, batch["targets"][:, :-1], -100)
    return lab


def measure_torch_matmul(n: int, reps: int) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


# ============================================================================ ours
class Ours:
    """Loaded as the trainer loads, its train_step jitted as the trainer jits it.  Writes the HF
    export of the loaded weights to ``export_dir`` if given (LoRA merged: lora_b = 0)."""

    def __init__(self, args, kind: str, batch_np, export_dir=None):
        import jax
        from regift_jax.core import sharding as shd
        from regift_jax.core.configs_util import merge_rules
        from regift_jax.data.pipeline import make_global_array
        from regift_jax.training import metrics, optim, state as state_lib, step as step_lib

        self.args, self.kind = args, kind
        c = preset_config(args, kind)
        mesh = shd.make_mesh({"data": int(c.mesh.data), "fsdp": int(c.mesh.fsdp),
                              "tensor": int(c.mesh.tensor)})
        rules = merge_rules(shd.DEFAULT_RULES, c.mesh.rules)
        with Timer() as t:
            h = state_lib.load_model(c.model, c.lora, args.seed, mesh, rules)
        self.load_s = t.wall
        model_cfg, self.run, self.lora = h.cfg, h.run, h.lora
        trainable, frozen, trainable_sh, frozen_sh = state_lib.split_trainable(
            model_cfg, h.lora, h.params, mesh, rules, run=h.run)
        h.params = None
        self.n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
        self.lora_a = None
        if c.lora.enabled:
            self.lora_a = {name: np.asarray(trainable["layers"]["self_attn"][name]["lora_a"])
                           for name in c.lora.targets}
        if export_dir:
            state_lib.export_model(model_cfg, h.lora, trainable, frozen, h.tokenizer, export_dir,
                                   "float32")

        batch_sh = shd.batch_sharding(mesh, rules)
        tx, schedule = optim.make_optimizer(c.optim, args.warmup + args.steps, trainable)
        state_sh, _ = state_lib.state_shardings(tx, trainable, trainable_sh, mesh)
        state = state_lib.init_state(tx, trainable, state_sh, args.seed)
        self.state = state
        del trainable, state
        self.frozen = frozen
        self.model_cfg = model_cfg
        self.flops_per_token = metrics.train_flops_per_token(
            model_cfg, args.seq, self.n_trainable if c.lora.enabled else 0)
        self.step_fn = step_lib.jit_train_step(model_cfg, tx, schedule, state_sh, frozen_sh,
                                               batch_sh, run=h.run, lora=h.lora)
        self.gbatch = make_global_array(batch_np, mesh, batch_sh.spec[0])

    def step(self) -> float:
        self.state, m = self.step_fn(self.state, self.frozen, self.gbatch)
        return float(m["loss"])  # waits for the step

    def skipped(self) -> int:
        import jax
        return int(jax.device_get(self.state.skipped))

    def breakdown(self, reps: int) -> dict:
        """Forward (+ loss) alone and forward + backward alone, jitted, best of ``reps``."""
        import jax
        from regift_jax.training import step as step_lib
        cfg, p, fr, b = self.model_cfg, self.state.params, self.frozen, self.gbatch
        kw = dict(model_cfg=cfg, run=self.run, lora=self.lora)
        fwd = jax.jit(functools.partial(step_lib.eval_step, **kw))
        fb = jax.jit(functools.partial(step_lib.loss_and_grads, **kw))
        key = jax.random.PRNGKey(0)
        return _best_of({"forward": lambda: jax.block_until_ready(fwd(p, fr, b)),
                         "forward+backward": lambda: jax.block_until_ready(fb(p, fr, b, key))},
                        reps)

    def close(self):
        import jax
        del self.state, self.frozen, self.step_fn, self.gbatch
        jax.clear_caches()
        gc.collect()


def _best_of(fns: dict, reps: int) -> dict:
    out = {}
    for name, fn in fns.items():
        fn()
        best = float("inf")
        for _ in range(max(reps, 1)):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name + "_s"] = best
    return out


# ============================================================================ baseline
class Torch:
    """The paper's stack on the same weights and batch (see the module docstring)."""

    def __init__(self, args, kind: str, batch_np, export_dir: str, lora_a):
        import torch
        import transformers
        self.args, self.kind = args, kind
        c = preset_config(args, kind)
        o = c.optim
        torch.manual_seed(args.seed)
        with Timer() as t:
            model = transformers.LlamaForCausalLM.from_pretrained(export_dir,
                                                                  dtype=torch.float32)
        self.load_s = t.wall
        model.config.use_cache = False
        if kind == "lora":
            import peft
            pc = peft.LoraConfig(r=int(c.lora.rank), lora_alpha=float(c.lora.alpha),
                                 lora_dropout=float(c.lora.dropout),
                                 target_modules=list(c.lora.targets), bias="none",
                                 task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, pc)
            with torch.no_grad():
                for i, layer in enumerate(model.base_model.model.model.layers):
                    for name in c.lora.targets:
                        mod = getattr(layer.self_attn, name)
                        a = np.ascontiguousarray(lora_a[name][i].reshape(-1, int(c.lora.rank)).T)
                        mod.lora_A["default"].weight.copy_(torch.from_numpy(a))
                        assert float(mod.lora_B["default"].weight.abs().max()) == 0.0
        if args.remat != "none":
            model.gradient_checkpointing_enable()
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for _, p in trainable)

        def no_decay(name):  # our optim.no_decay (norm scales, biases, the embedding)
            return name.endswith("norm.weight") or name.endswith(".bias") or "embed_tokens" in name
        groups = [{"params": [p for n, p in trainable if not no_decay(n)],
                   "weight_decay": float(o.weight_decay)},
                  {"params": [p for n, p in trainable if no_decay(n)], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]],
                                     lr=float(o.learning_rate), betas=(float(o.b1), float(o.b2)),
                                     eps=float(o.eps))
        self.params = [p for _, p in trainable]
        self.clip = float(o.clip_norm)
        self.model = model
        self.ids = torch.from_numpy(batch_np["inputs"].astype(np.int64))
        self.attn = torch.from_numpy((batch_np["segment_ids"] != 0).astype(np.int64))
        self.labels = torch.from_numpy(torch_labels(batch_np))

    def step(self) -> float:
        import torch
        out = self.model(input_ids=self.ids, attention_mask=self.attn, labels=self.labels)
        out.loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def breakdown(self, reps: int) -> dict:
        import torch
        m = self.model

        def fwd():
            with torch.no_grad():
                m(input_ids=self.ids, attention_mask=self.attn, labels=self.labels)

        def fb():
            m(input_ids=self.ids, attention_mask=self.attn, labels=self.labels).loss.backward()
            m.zero_grad(set_to_none=True)
        return _best_of({"forward": fwd, "forward+backward": fb}, reps)

    def close(self):
        del self.model, self.opt, self.params
        gc.collect()


# ============================================================================ workers
# Each stack of each configuration runs in its own worker process (this file with --worker), so
# that one stack's freed-but-retained heap never adds to the other's peak, and neither stack's
# thread pool spins while the other runs.  The parent sends one command per line on stdin and
# reads one JSON reply per line on the worker's (duplicated) stdout.

def worker_main(args) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else the worker prints goes to stderr
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj, default=float) + "\n")
        proto.flush()

    stack_name, kind = args.worker.split(":")
    wdir = args.worker_dir
    batch = dict(np.load(os.path.join(wdir, "batch.npz")))
    export_dir, lora_path = os.path.join(wdir, "hf"), os.path.join(wdir, "lora_a.npz")
    if stack_name == "ours":
        from regift_jax.core import configs_util
        flags = configs_util.resolve_xla_cpu_flags(args.xla_cpu_flags)
        log(f"  ours/{kind}: XLA_FLAGS={configs_util.apply_xla_cpu_flags(flags)!r}")
        need_export = not os.path.exists(os.path.join(export_dir, "config.json"))
        stack = Ours(args, kind, batch, export_dir if need_export else None)
        if stack.lora_a is not None:
            np.savez(lora_path, **stack.lora_a)
        info = {"flops_per_token": stack.flops_per_token}
    else:
        if args.torch_threads > 0:
            import torch
            torch.set_num_threads(args.torch_threads)
        lora_a = dict(np.load(lora_path)) if kind == "lora" else None
        stack = Torch(args, kind, batch, export_dir, lora_a)
        info = {}
    send({"load_s": stack.load_s, "n_trainable": stack.n_trainable, **info})
    for line in sys.stdin:
        op = json.loads(line)["op"]
        if op == "step":
            with Timer() as t:
                loss = stack.step()
            send({"loss": loss, "wall": t.wall, "cpu": t.cpu})
        elif op == "breakdown":
            send(stack.breakdown(args.steps))
        elif op == "quit":
            out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
            if stack_name == "ours":
                out["skipped"] = stack.skipped()
            send(out)
            break


class Worker:
    def __init__(self, name: str, argv, wdir: str):
        import subprocess
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name,
               "--worker_dir", wdir]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
        self.info = self._recv()

    def _recv(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            hint = " (-9: killed, out of memory? see --remat / --order sequential)" if rc == -9 \
                else ""
            raise RuntimeError(f"worker {self.name} died with exit status {rc}{hint}")
        return json.loads(line)

    def call(self, op: str) -> dict:
        self.p.stdin.write(json.dumps({"op": op}) + "\n")
        self.p.stdin.flush()
        return self._recv()

    def close(self) -> dict:
        out = self.call("quit")
        self.p.stdin.close()
        self.p.wait()
        return out

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def run_config(args, argv, kind: str, wdir: str) -> dict:
    """Both stacks of one configuration.  ``--order sequential`` (default): one stack after the
    other, one worker alive at a time; ``interleaved``: both workers alive, timed steps alternate
    (ours, torch, ours, ...) so that both see the same machine load (both stacks' memory)."""
    res = {side: {"losses": [], "step_s": [], "cpu_s": []} for side in ("ours", "torch")}
    workers = {}

    def start(side):
        workers[side] = Worker(f"{side}:{kind}", argv, wdir)
        res[side].update(workers[side].info)
        log(f"  {side}/{kind}: loaded in {workers[side].info['load_s']:.1f} s; {load_avg()}")

    def warm(side):
        with Timer() as t:
            for _ in range(args.warmup):
                res[side]["losses"].append(workers[side].call("step")["loss"])
        res[side]["warmup_s"] = t.wall
        log(f"  {side}/{kind}: {args.warmup} warm-up step(s) {t.wall:.1f} s"
            f"{' (incl. compilation)' if side == 'ours' else ''}; {load_avg()}")

    def timed(side, i):
        r = workers[side].call("step")
        res[side]["losses"].append(r["loss"])
        res[side]["step_s"].append(r["wall"])
        res[side]["cpu_s"].append(r["cpu"])
        log(f"  {side}/{kind}: timed step {i + 1}/{args.steps} {r['wall']:.2f} s wall, "
            f"{r['cpu']:.2f} s CPU; {load_avg()}")

    def finish(side):
        if args.breakdown:
            res[side]["breakdown"] = b = workers[side].call("breakdown")
            log(f"  {side}/{kind} breakdown (best of {max(args.steps, 1)}): " + ", ".join(
                f"{k[:-2]} alone {v:.2f} s" for k, v in b.items()))
        res[side].update(workers.pop(side).close())
        log(f"  {side}/{kind}: worker peak RSS {res[side]['peak_rss_gib']:.1f} GiB")

    try:
        if args.order == "sequential":
            for side in ("ours", "torch"):
                start(side)
                warm(side)
                for i in range(args.steps):
                    timed(side, i)
                finish(side)
        else:
            for side in ("ours", "torch"):
                start(side)
            for side in ("ours", "torch"):
                warm(side)
            for i in range(args.steps):
                for side in ("ours", "torch"):
                    timed(side, i)
            for side in ("ours", "torch"):
                finish(side)
    finally:
        for w in workers.values():
            w.kill()
    return res


# ============================================================================ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (ours: compilation)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps")
    ap.add_argument("--configs", default="lora,full", help="comma list of lora, full")
    ap.add_argument("--remat", default="none",
                    help="ours: model.remat_policy; torch: gradient checkpointing unless none")
    ap.add_argument("--attention_chunk", type=int, default=-1,
                    help="ours: model.attention_chunk (-1: the preset's; 0: off)")
    ap.add_argument("--loss_chunk", type=int, default=-1,
                    help="ours: model.loss_chunk (-1: the preset's; 0: full logits)")
    ap.add_argument("--xla_cpu_flags", default="config",
                    help="ours: XLA CPU flags applied in our worker as the trainer's entry point "
                         "does ('config' = the base config's xla_cpu_flags, off by default; "
                         "'xnnpack' = configs_util.XNNPACK_DOT_FLAGS; '' = none); the "
                         "peak matmul is measured in the parent process without them")
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--full_lr", type=float, default=2e-5, help="full fine-tuning lr (paper's)")
    ap.add_argument("--matmul_n", type=int, default=4096)
    ap.add_argument("--matmul_reps", type=int, default=5)
    ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the forward alone and forward+backward alone")
    ap.add_argument("--order", default="sequential", choices=("sequential", "interleaved"),
                    help="sequential: one stack's worker at a time; interleaved: both alive, "
                         "timed steps alternate (fairer on a loaded machine, but both stacks' "
                         "memory at once: 8 x 512 does not fit in 24 GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the figures to this file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: stack:kind
    ap.add_argument("--worker_dir", default="", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    kinds = [k.strip() for k in args.configs.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("lora", "full")]
    if bad or not kinds:
        ap.error(f"--configs: unknown {bad}; valid: lora, full")

    t0 = time.time()
    others_start = others_busy_cores()
    import jax
    import torch
    import transformers
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    log(f"train step benchmark: SmolLM2-135M-Instruct, float32 params and compute, batch "
        f"{args.batch} x seq {args.seq}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"configs {kinds}, remat {args.remat}")
    log(f"  jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; {os.cpu_count()} CPUs; {load_avg()}; other processes "
        f"busy {others_start:.2f} cores")

    # ------------------------------------------------------------- peak
    from regift_jax.training.metrics import measure_matmul_flops
    peak = measure_matmul_flops(args.matmul_n, args.matmul_reps)
    peak_torch = measure_torch_matmul(args.matmul_n, args.matmul_reps)
    log(f"  peak: jitted float32 {args.matmul_n}^2 matmul, best of "
        f"{args.matmul_reps}: {peak / 1e9:.1f} GFLOP/s  (torch.mm, for information: "
        f"{peak_torch / 1e9:.1f} GFLOP/s); {load_avg()}")

    from regift_jax.models.tokenizer import load_tokenizer, smollm2_gguf_path
    batch, template_id = make_batch(args, load_tokenizer(smollm2_gguf_path()))
    nonpad = int((batch["segment_ids"] != 0).sum())
    slots = int(batch["segment_ids"].size)
    n_loss = int(batch["loss_mask"].sum())
    log(f"  batch: {args.batch} rows x {args.seq} slots, template {template_id}, packing none: "
        f"{nonpad} non-pad tokens ({nonpad / slots:.2f} of slots), {n_loss} loss tokens")

    results = {}
    order = sorted(kinds, key=lambda k: k != "lora")  # LoRA first: its init is copied to PEFT
    with tempfile.TemporaryDirectory(prefix="train_step_bench_") as wdir:
        np.savez(os.path.join(wdir, "batch.npz"), **batch)
        for kind in order:
            results[kind] = run_config(args, argv, kind, wdir)
    peak_end = measure_matmul_flops(args.matmul_n, args.matmul_reps)
    log(f"  peak again at the end: {peak_end / 1e9:.1f} GFLOP/s; {load_avg()}")
    peak_start, peak = peak, max(peak, peak_end)
    others_end = others_busy_cores()

    # ------------------------------------------------------------- report
    rows = []
    log("")
    for kind in order:
        r = results[kind]
        flops_tok = r["flops_per_token"] = r["ours"].pop("flops_per_token")
        for side in ("ours", "torch"):
            s = r[side]
            timed = sum(s["step_s"])
            s["tokens_per_s"] = nonpad * args.steps / timed
            s["slots_per_s"] = slots * args.steps / timed
            s["mean_step_s"] = timed / args.steps
            s["mfu"] = flops_tok * s["tokens_per_s"] / peak
            s["mfu_slots"] = flops_tok * s["slots_per_s"] / peak
            s["first_loss"] = s["losses"][0]
            s["cpu_s_per_step"] = sum(s["cpu_s"]) / args.steps
        ours, base = r["ours"], r["torch"]
        r["ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        r["first_loss_abs_diff"] = abs(ours["first_loss"] - base["first_loss"])
        label = "LoRA r16 a32 q,v" if kind == "lora" else "full FT"
        log(f"{label}: trainable ours {ours['n_trainable']:,} / torch {base['n_trainable']:,}; "
            f"{flops_tok / 1e9:.3f} GFLOP per token (train_flops_per_token)")
        tname = "torch+HF+PEFT " if kind == "lora" else "torch+HF      "
        for s, name in ((ours, "ours (jax jit)"), (base, tname)):
            log(f"  {name}: {s['tokens_per_s']:8.1f} tok/s ({s['mean_step_s']:.2f} s/step, "
                f"{s['cpu_s_per_step']:.2f} CPU s/step), MFU {100 * s['mfu']:.1f}% (per slot "
                f"{100 * s['mfu_slots']:.1f}%), losses "
                f"{' '.join(f'{x:.6f}' for x in s['losses'])}")
        log(f"  ratio ours / torch: {r['ratio']:.2f}x "
            f"({'meets' if r['ratio'] >= 2 else 'BELOW'} the 2x goal); our MFU "
            f"{'meets' if ours['mfu'] >= 0.4 else 'BELOW'} the 40% goal; first-step loss "
            f"ours {ours['first_loss']:.6f} torch {base['first_loss']:.6f} "
            f"(|diff| {r['first_loss_abs_diff']:.1e})")
        rows.append(
            f"| {label} | {args.batch}x{args.seq} | {ours['tokens_per_s']:.0f} | "
            f"{base['tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
            f"{100 * ours['mfu']:.1f}% ({100 * ours['mfu_slots']:.1f}%) | "
            f"{100 * base['mfu']:.1f}% ({100 * base['mfu_slots']:.1f}%) | "
            f"{ours['first_loss']:.5f} / {base['first_loss']:.5f} |")
    log("")
    log(f"peak {peak / 1e9:.1f} GFLOP/s (jitted float32 {args.matmul_n}^2 matmul, best at start / "
        f"end of this run: {peak_start / 1e9:.1f} / {peak_end / 1e9:.1f}); tokens/s = non-pad; "
        f"float32 both stacks; {load_avg()}; wall {time.time() - t0:.0f} s")
    busy = (max(others_start, others_end) > 0.3 or peak_end < 0.8 * peak_start
            or peak_start < 0.8 * peak_end)
    log(f"other processes busy {others_start:.2f} cores at the start, {others_end:.2f} at the end")
    if busy:
        log(f"WARNING: the machine was busy (other processes {others_start:.2f} / "
            f"{others_end:.2f} cores at start / end; matmul peak {peak_start / 1e9:.0f} -> "
            f"{peak_end / 1e9:.0f} GFLOP/s): another process competing for the cores slows both "
            f"stacks (at small sizes torch's OpenMP pool far more than XLA's), so these figures "
            f"are not representative; rerun on an idle machine")
    log("| config | batch x seq | ours tok/s | torch tok/s | ratio | ours MFU (per slot) | "
        "torch MFU (per slot) | first-step loss ours / torch |")
    log("|---|---|---|---|---|---|---|---|")
    for row in rows:
        log(row)
    if args.json:
        out = {"args": vars(args), "peak_flops": peak, "peak_flops_start": peak_start,
               "peak_flops_end": peak_end, "peak_flops_torch_mm": peak_torch,
               "nonpad_tokens": nonpad, "slots": slots, "loss_tokens": n_loss,
               "dtype": "float32", "others_busy_cores_start": others_start,
               "others_busy_cores_end": others_end, "machine_busy": busy,
               "load_avg_end": os.getloadavg(),
               "wall_s": time.time() - t0, "configs": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
        log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
