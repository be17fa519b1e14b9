"""Training metrics: MFU, the per-interval summary and where it is written.

Every ``log.every_steps`` steps: loss and token accuracy (token-weighted over the interval),
learning rate, grad norm (interval mean), tokens/s (non-padding tokens), step time and MFU, to
stdout (tqdm progress bar), TensorBoard (``<workdir>/tensorboard``, tensorboardX) and
``<workdir>/metrics.jsonl``; process 0 writes.  A run that starts at step ``s`` (a resume) first
rewinds both to ``s``: the records of later steps, written before the run was stopped and about to
be computed again, are dropped (TensorBoard's ``purge_step``), so each step appears once.

MFU = achieved model FLOP/s / peak FLOP/s.  Model FLOPs per step = ``B * T *
flops_per_token(T)`` (:meth:`ModelConfig.flops_per_token`: ``6 N + 12 L H hd T``, every row slot
counted, padding included, since it is computed).  With LoRA the weight gradients of the frozen
matrices are not computed, so ``2 N_frozen`` per token is subtracted and ``6 N_lora`` added.
Peak: ``log.peak_flops_per_device`` if > 0, else a table of dense bf16 peaks of known
accelerators (:data:`PEAK_FLOPS`), else (CPU) a float32 matmul measured once at start-up; on CPU
that figure is the whole host's, so the total peak is per-process rather than per-device.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from regift_jax.core.io import LineCounts, atomic_write_text, iter_jsonl
from regift_jax.models.config import ModelConfig

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device (vendor figures); matched as substrings of device_kind.
PEAK_FLOPS = (
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10", 125e12),
)


# ============================================================================ FLOPs
def measure_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a jitted float32 ``n x n x n`` matmul on the default device, best of ``reps``
    (after one untimed call)."""
    f = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((n, n), jnp.float32)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


_measured_cpu_flops = functools.lru_cache(maxsize=None)(measure_matmul_flops)


def peak_flops_per_device(configured: float = -1.0, device=None) -> Tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained).  See the module docstring."""
    if configured and configured > 0:
        return float(configured), "configured"
    device = device or jax.local_devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, val in PEAK_FLOPS:
        if key in kind:
            return val, f"table ({key})"
    if device.platform == "cpu":
        return _measured_cpu_flops(), "measured (float32 matmul, whole host)"
    return float("nan"), f"unknown device kind {kind!r}"


def train_flops_per_token(cfg: ModelConfig, seq_len: int, n_lora: int = 0) -> float:
    """Executed training FLOPs per token slot (see the module docstring); ``n_lora``: the LoRA
    adapter parameters (0: full fine-tuning)."""
    full = cfg.flops_per_token(seq_len)
    if n_lora <= 0:
        return full
    attn = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    n_matmul = (full - attn) / 6.0
    return full - 2.0 * n_matmul + 6.0 * n_lora


def total_peak_flops(configured: float) -> Tuple[float, float, str]:
    """(peak of one device, peak of the whole run, source): on CPU the measured peak is the
    whole host's, so the run's peak counts processes rather than devices."""
    peak, source = peak_flops_per_device(configured)
    on_cpu = jax.local_devices()[0].platform == "cpu"
    return peak, peak * (jax.process_count() if on_cpu else jax.device_count()), source


# ============================================================================ summaries
def summarise(host: List[dict], dt: float, slots: int, flops_tok: float, total_peak: float):
    """The logged train values of the steps in ``host`` (their metrics, on the host) that took
    ``dt`` seconds over ``slots`` token slots."""
    tokens = sum(float(m["tokens"]) for m in host)
    loss = sum(float(m["loss"]) * float(m["tokens"]) for m in host) / max(tokens, 1.0)
    correct = sum(float(m["correct"]) for m in host)
    nonpad = sum(float(m["nonpad"]) for m in host)
    steps = len(host)
    out = {
        "loss": loss, "accuracy": correct / max(tokens, 1.0),
        "learning_rate": float(host[-1]["learning_rate"]),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in host])),
        "tokens_per_s": nonpad / dt if dt > 0 else float("nan"),
        "step_time_s": dt / steps,
        "mfu": (slots * flops_tok / dt) / total_peak if dt > 0 and total_peak > 0 else float(
            "nan"),
        "skipped": float(host[-1]["skipped"]),
    }
    if steps == 1:
        out["loss"] = float(host[0]["loss"])
    return out


def _fmt(v) -> str:
    v = float(v)
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4f}"
    return f"{v:.3e}"


def rewind_metrics(path: str, step: int) -> int:
    """Keep the records of ``path`` (metrics.jsonl) up to ``step`` (none when ``step`` is 0: a
    fresh start); returns how many were dropped.  Unreadable lines (a write cut by a kill) are
    dropped and counted too."""
    if not os.path.exists(path):
        return 0
    counts = LineCounts()
    keep = [rec for _, rec in iter_jsonl(path, counts)
            if step > 0 and isinstance(rec.get("step"), int) and rec["step"] <= step]
    dropped = counts.n_lines - len(keep)
    if dropped:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        log.info("%s rewound to step %d: %d later or unreadable records dropped", path, step,
                 dropped)
    return dropped


class MetricsLogger:
    """stdout (via tqdm.write when a bar is shown), TensorBoard and metrics.jsonl; process 0."""

    def __init__(self, workdir: str, lcfg, total_steps: int, start_step: int):
        self.main = jax.process_index() == 0
        self.history: List[dict] = []
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not self.main:
            return
        if lcfg.tensorboard:
            # lazy: tensorboardX imports torch whenever torch is installed; only log.tensorboard
            # needs it
            from tensorboardX import SummaryWriter
            tb_dir = os.path.join(workdir, "tensorboard")
            purge = start_step + 1 if os.path.isdir(tb_dir) else None  # a resume: drop later
            self.tb = SummaryWriter(tb_dir, purge_step=purge)
        path = os.path.join(workdir, METRICS_FILE)
        rewind_metrics(path, start_step)
        self.jsonl = open(path, "a")
        if lcfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def write(self, step: int, prefix: str, values: Dict[str, float]):
        rec = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
        self.history.append(rec)
        if not self.main:
            return
        line = f"[{prefix} step {step}] " + " ".join(
            f"{k}={_fmt(v)}" for k, v in values.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(float(v)):
                    self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
            self.tb.flush()
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def advance(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
