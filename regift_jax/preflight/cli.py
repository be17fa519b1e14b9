"""Command line of the TPU preflight (``python -m regift_jax.preflight``).

    python -m regift_jax.preflight --config=configs/llama.py:llama3_1_8b --topology=v5e:4x4
    python -m regift_jax.preflight --config=configs/llama.py:llama3_1_8b_full \\
        --accelerator_type=v6e-8 --config.model.remat_policy=full --out=report.json
    python -m regift_jax.preflight --config=configs/teacher_qwen2.py --accelerator_type=v5e-16 \\
        --mesh=fsdp=-1
    python -m regift_jax.preflight --config=configs/eval.py --model=llama-3.1-8b \\
        --accelerator_type=v5e-8 --mesh=fsdp=-1

``--config`` takes any train (``configs/llama.py`` ...), teacher (``configs/teacher_*.py``) or
eval (``configs/eval.py``) config with ``--config.KEY=VALUE`` overrides; the slice is
``--topology`` (``v5e:2x4``) or ``--accelerator_type`` (``v5e-8``, ``v5litepod-16``, ``v4-32``).
``--out`` writes the reports as JSON: ``{"reports": [one entry per stage]}`` with ``stage``,
``fits``, ``hbm_gib_per_chip``, ``step_seconds``, ``tokens_per_s_per_chip``, ``mfu`` and the rest
of :class:`regift_jax.preflight.report.StageReport`.

Exit status: 0 when every stage fits, 3 when one does not (the message names the largest buffers
and what would fit), 2 for a bad config, slice or flag, or without libtpu.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

import jax
from absl import app, flags
from ml_collections import config_flags

from regift_jax import preflight
from regift_jax.core.io import atomic_write_json
from regift_jax.preflight.report import StageReport

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "train, teacher or eval config file (configs/*.py[:preset])",
    lock_config=False)
flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:2x4, v4:2x2x4, v6e:2x4")
flags.DEFINE_string("accelerator_type", "", "Cloud TPU accelerator type, e.g. v5e-8, "
                    "v5litepod-16, v4-32, v5p-8, v6e-8")
flags.DEFINE_string("out", "", "write the reports as JSON here")
flags.DEFINE_string("mesh", "", "teacher / eval configs: the mesh, e.g. fsdp=-1 or "
                    "data=2,tensor=4 ('' = the config's: unsharded for teachers, runtime.mesh "
                    "for eval)")
flags.DEFINE_string("model", "", "eval configs: the model (preset name or HF directory)")
flags.DEFINE_integer("prompt_len", 1024, "sampler stages: prompt tokens per row")
flags.DEFINE_bool("estimate", True, "estimate the step time (two to four shallower compiles "
                  "per stage)")
flags.DEFINE_bool("explain_oom", True, "when a program does not fit, compile it once more to "
                  "read its memory and name its largest buffers")
flags.DEFINE_list("stages", [], "only these stages (train, prefill, decode, score)")
FLAGS = flags.FLAGS
NO_FIT = 3  # exit status when a stage does not fit (1 is Python's for a crash)


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def describe(r: StageReport) -> List[str]:
    """The report as text lines."""
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"[preflight] {r.stage}: {r.config or r.model} on {r.accelerator_type} "
             f"({r.topology}), {r.chips} chip(s), mesh {mesh}, remat {r.remat_policy}"]
    if r.fits:
        lines.append(f"  FITS: {r.hbm_gib_per_chip:.2f} of {r.hbm_capacity_gib:g} GiB per chip "
                     f"(headroom {r.headroom_gib:.2f} GiB): parameters {r.params_gib:.2f}, "
                     f"optimizer state {r.opt_state_gib:.2f}, KV cache {r.cache_gib:.2f}, "
                     f"temporaries {r.temporaries_gib:.2f} GiB")
    else:
        lines.append("  DOES NOT FIT: " + r.message.replace("\n", "\n  "))
    if r.step_seconds is not None:
        fc = r.flop_check
        lines.append(f"  step (ESTIMATE): {r.step_seconds:.4g} s (no-overlap bound "
                     f"{r.step_seconds_bound:.4g} s), {r.tokens_per_s_per_chip:,.0f} tokens/s "
                     f"per chip, MFU {100 * r.mfu:.1f}%")
        lines.append(f"  per chip per step: {_g(r.flops_per_step_per_chip)} FLOPs, "
                     f"{_g(r.bytes_per_step_per_chip)} bytes; FLOP check XLA/analytic "
                     f"{fc['ratio']:.3f} ({'ok' if fc['ok'] else 'OFF'}, tolerance "
                     f"{100 * fc['tolerance']:.0f}%)")
    if r.collectives:
        lines.append("  collectives in the compiled HLO: " + ", ".join(
            f"{k} x{v['count']} ({v['bytes'] / 2**20:,.0f} MiB)" for k, v in
            sorted(r.collectives.items())))
    lines.extend(f"  note: {n}" for n in r.notes)
    return lines


def _slice_name() -> str:
    if bool(FLAGS.topology) == bool(FLAGS.accelerator_type):
        raise preflight.PreflightError("give exactly one of --topology and --accelerator_type")
    return FLAGS.topology or FLAGS.accelerator_type


def _run() -> List[StageReport]:
    spec = FLAGS["config"].config_filename
    reports = preflight.run(_CONFIG.value, _slice_name(), config_name=spec,
                            mesh=FLAGS.mesh or None, model=FLAGS.model,
                            prompt_len=FLAGS.prompt_len, estimate=FLAGS.estimate,
                            explain_oom=FLAGS.explain_oom, only=FLAGS.stages)
    for r in reports:
        print("\n".join(describe(r)), flush=True)
    if FLAGS.out:
        atomic_write_json(FLAGS.out, {"reports": [r.to_json() for r in reports]})
        print(f"[preflight] wrote {FLAGS.out}", flush=True)
    return reports


def main(argv) -> None:
    del argv
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the TPU is compiled for, never attached
    try:
        reports = _run()
    except (preflight.PreflightError, preflight.TopologyError, preflight.LibtpuMissing,
            FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    bad = [r.stage for r in reports if not r.fits]
    if bad:
        print(f"[preflight] does not fit: {', '.join(bad)}", file=sys.stderr)
        sys.exit(NO_FIT)


def run_cli() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(main)
