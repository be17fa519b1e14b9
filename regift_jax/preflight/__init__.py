"""TPU preflight: compile a config's programs for a real TPU slice on this machine (no TPU, no
weights, no data), size them per chip, estimate their speed, and refuse what does not fit.

    python -m regift_jax.preflight --config=configs/llama.py:llama3_1_8b --topology=v5e:2x4
    python -m regift_jax.preflight --config=configs/teacher_qwen2.py --accelerator_type=v5e-16 \\
        --mesh=fsdp=-1 --out=report.json

    >>> from regift_jax import preflight
    >>> reports = preflight.run(config, "v5e-8")          # one StageReport per stage

libtpu (``pip install -e '.[tpu]'``) provides the TPU compiler; JAX itself runs on the CPU
(``python -m regift_jax.preflight`` sets ``JAX_PLATFORMS=cpu`` before JAX starts).  Stages:
``train`` (train configs: the train step, LoRA or full), ``prefill`` and ``decode`` (teacher
configs, and eval configs with ``mode=generate``), ``score`` (eval configs, ``mode=loglik``).

Modules: :mod:`~regift_jax.preflight.hardware` (chips and slices),
:mod:`~regift_jax.preflight.programs` (the abstract programs),
:mod:`~regift_jax.preflight.compiled` (what a compiled executable or a failed compile says),
:mod:`~regift_jax.preflight.estimate` (the step time ESTIMATE and how it is made),
:mod:`~regift_jax.preflight.report` (one stage's report and the advice when it does not fit),
:mod:`~regift_jax.preflight.cli` (the command line).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from regift_jax.preflight import programs
from regift_jax.preflight.hardware import (CHIPS, LibtpuMissing, Slice, TopologyError,
                                           libtpu_available, parse_slice, topology_devices)
from regift_jax.preflight.programs import PreflightError, Stage
from regift_jax.preflight.report import StageReport, run_stage

__all__ = ["run", "stages", "config_kind", "StageReport", "Stage", "PreflightError",
           "TopologyError", "LibtpuMissing", "parse_slice", "libtpu_available", "CHIPS", "Slice"]

KINDS = ("train", "teacher", "eval")


def config_kind(config) -> str:
    """``train``, ``teacher`` or ``eval``, from the config's sections."""
    keys = set(config.keys())
    if "teacher" in keys:
        return "teacher"
    if {"runtime", "loglik", "mode"} <= keys:
        return "eval"
    if {"model", "train", "optim", "mesh"} <= keys:
        return "train"
    raise PreflightError(f"not a train, teacher or eval config (top-level keys: "
                         f"{', '.join(sorted(keys))})")


def stages(config, sl: Slice, *, mesh: Optional[str] = None, model: str = "",
           prompt_len: int = 1024) -> List[Stage]:
    """The programs ``config`` runs, built for the devices of ``sl``.  ``mesh`` (``"fsdp=-1"``)
    replaces the layout of teacher and eval configs (train configs use ``config.mesh``);
    ``model`` names the model of an eval config; ``prompt_len``: prompt tokens of the sampler."""
    devices = topology_devices(sl.topology)
    kind = config_kind(config)
    if kind == "train":
        if mesh:
            raise PreflightError("--mesh is for teacher and eval configs; a train config's "
                                 "layout is config.mesh (--config.mesh.fsdp=-1 ...)")
        return [programs.train_stage(config, devices)]
    shape = programs.parse_mesh(mesh)
    if kind == "teacher":
        return programs.teacher_stages(config, devices, shape, prompt_len)
    return programs.eval_stages(config, devices, shape, model, prompt_len)


def run(config, slice_name: str, *, config_name: str = "", mesh: Optional[str] = None,
        model: str = "", prompt_len: int = 1024, estimate: bool = True,
        explain_oom: bool = True, only: Sequence[str] = ()) -> List[StageReport]:
    """Preflight every stage of ``config`` (or those named in ``only``) on the slice
    ``slice_name`` (``"v5e-8"``, ``"v5e:2x4"``); one :class:`StageReport` per stage.
    ``estimate``: estimate step times (two to four shallower compiles per stage);
    ``explain_oom``: compile a program that does not fit once more to name its largest
    buffers."""
    sl = parse_slice(slice_name)
    todo = stages(config, sl, mesh=mesh, model=model, prompt_len=prompt_len)
    unknown = set(only) - {s.name for s in todo}
    if unknown:
        raise PreflightError(f"--stages: {', '.join(sorted(unknown))} not among this config's "
                             f"stages ({', '.join(s.name for s in todo)})")
    return [run_stage(s, sl, config_name, estimate, explain_oom) for s in todo
            if not only or s.name in only]
