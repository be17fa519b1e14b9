"""One stage's preflight: compile the real program for the slice, size it per chip, estimate its
step, and say what would fit when it does not."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Optional

from regift_jax.core.memory import Memory, memory
from regift_jax.preflight import compiled as comp
from regift_jax.preflight.estimate import FLOP_TOLERANCE, METHOD, Estimate, estimate
from regift_jax.preflight.hardware import GIB, Slice
from regift_jax.preflight.programs import Stage
from regift_jax.training.memory import PLAN_FRACTION, fitting_micro_batch



@dataclasses.dataclass
class StageReport:
    """The preflight of one stage on one slice (every size per chip; times are ESTIMATES)."""
    stage: str
    config: str
    topology: str
    accelerator_type: str
    chips: int  # chips the program runs on (its mesh)
    mesh: Dict[str, int]
    model: str
    remat_policy: str
    tokens_per_step: int
    fits: bool
    hbm_gib_per_chip: Optional[float]  # what the program needs per chip
    hbm_capacity_gib: float
    headroom_gib: Optional[float]
    params_gib: float
    opt_state_gib: float
    cache_gib: float
    temporaries_gib: Optional[float]
    arguments_gib: Optional[float] = None  # the compiler's argument buffers (state + batch)
    step_seconds: Optional[float] = None
    step_seconds_bound: Optional[float] = None
    tokens_per_s_per_chip: Optional[float] = None
    mfu: Optional[float] = None
    flops_per_step_per_chip: Optional[float] = None
    bytes_per_step_per_chip: Optional[float] = None
    flop_check: Optional[dict] = None
    pieces: Dict[str, dict] = dataclasses.field(default_factory=dict)  # the estimate's parts
    collectives: Dict[str, dict] = dataclasses.field(default_factory=dict)
    estimate_method: str = ""
    message: str = ""
    largest_buffers: List[str] = dataclasses.field(default_factory=list)
    compiler_message: str = ""  # the start of the compiler's out-of-memory error
    compile_seconds: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _gib(x) -> Optional[float]:
    return None if x is None else round(float(x) / GIB, 6)


def _base(stage: Stage, sl: Slice, config_name: str, v) -> dict:
    """The fields every report has: what ran where, and the state it holds per chip."""
    return dict(stage=stage.name, config=config_name, topology=sl.topology,
                accelerator_type=sl.accelerator_type, chips=int(stage.mesh.size),
                mesh={k: int(n) for k, n in stage.mesh.shape.items()},
                model=stage.cfg.name, remat_policy=stage.run.remat_policy,
                tokens_per_step=int(stage.tokens), hbm_capacity_gib=sl.chip.hbm_gib,
                params_gib=_gib(comp.per_chip_bytes(v.params)),
                opt_state_gib=_gib(comp.per_chip_bytes(v.opt_state or {})),
                cache_gib=_gib(comp.per_chip_bytes(v.cache or {})), notes=list(stage.notes))


def _collective_table(exe, n: int) -> Dict[str, dict]:
    return {k: {"count": int(c.count), "bytes": int(c.bytes)}
            for k, c in comp.collectives(exe.as_text(), n).items()}


def _add_estimate(rep: StageReport, stage: Stage, sl: Slice, est: Estimate) -> None:
    rep.step_seconds = est.step_seconds
    rep.pieces = {name: {"flops": p.cost.flops, "bytes": p.cost.bytes, "seconds": p.seconds,
                         "collective_bytes": p.cost.moved_bytes}
                  for name, p in est.pieces.items()}
    rep.step_seconds_bound = est.bound_seconds
    rep.tokens_per_s_per_chip = stage.tokens / est.step_seconds / stage.mesh.size
    rep.mfu = stage.model_flops / (est.step_seconds * stage.mesh.size * sl.chip.peak_flops)
    rep.flops_per_step_per_chip = est.cost.flops
    rep.bytes_per_step_per_chip = est.cost.bytes
    rep.flop_check = {"xla_flops": est.xla_flops_total, "analytic_flops": est.analytic_flops,
                      "ratio": est.flop_ratio, "tolerance": FLOP_TOLERANCE,
                      "ok": est.flop_check_ok}
    rep.estimate_method = METHOD
    # the costing compiles add notes to the stage (kernels the cost model cannot see)
    rep.notes.extend([n for n in stage.notes if n not in rep.notes] + est.warnings)


#: Compile options that let an out-of-memory program compile, so that its memory can be read.
EXPLAIN_OPTIONS = {"xla_tpu_no_crash_on_oom": True}


def _not_fitting(stage: Stage, sl: Slice, base: dict, v, err: BaseException, explain: bool,
                 t0: float) -> StageReport:
    """The report of a program the compiler refused for memory; with ``explain`` it is compiled
    again with :data:`EXPLAIN_OPTIONS` for its real memory and largest buffers."""
    need, _, largest = comp.out_of_memory(err)
    temps = args = None
    notes = []
    if explain:
        try:
            exe = v.lowered.compile(compiler_options=EXPLAIN_OPTIONS)
        except Exception as e:  # noqa: BLE001  (the compiler may refuse such a program)
            notes.append(f"the compile for the memory breakdown failed too: {str(e)[:200]}")
        else:
            mem = memory(exe)
            need, temps, args = float(mem.total), mem.temporaries, mem.arguments
            largest = comp.largest_buffers(exe.as_text())
    base = dict(base, notes=base["notes"] + notes)
    rep = StageReport(**base, fits=False, hbm_gib_per_chip=_gib(need),
                      headroom_gib=None if need is None else _gib(sl.chip.hbm_bytes - need),
                      temporaries_gib=_gib(temps), arguments_gib=_gib(args),
                      largest_buffers=largest,
                      compiler_message=str(err)[:4000])
    rep.message = advice(rep, stage, sl, need)
    rep.compile_seconds = time.time() - t0
    return rep


def run_stage(stage: Stage, sl: Slice, config_name: str = "", with_estimate: bool = True,
              explain_oom: bool = True) -> StageReport:
    """Compile ``stage``'s real program for ``sl`` and report (see :class:`StageReport`);
    ``explain_oom``: when it does not fit, compile it once more to name its largest buffers."""
    t0 = time.time()
    v = stage.build(stage.cfg.num_layers, False)
    base = _base(stage, sl, config_name, v)
    try:
        exe = v.lowered.compile()
    except Exception as e:  # noqa: BLE001  (the compiler's own errors carry the facts)
        if not comp.is_out_of_memory(e):
            raise
        return _not_fitting(stage, sl, base, v, e, explain_oom, t0)
    mem = memory(exe)
    fits = mem.total <= sl.chip.hbm_bytes
    rep = StageReport(**base, fits=fits, hbm_gib_per_chip=_gib(mem.total),
                      headroom_gib=_gib(sl.chip.hbm_bytes - mem.total),
                      temporaries_gib=_gib(mem.temporaries), arguments_gib=_gib(mem.arguments),
                      collectives=_collective_table(exe, stage.mesh.size))
    if not fits:
        rep.largest_buffers = comp.largest_buffers(exe.as_text())
        rep.message = advice(rep, stage, sl, mem.total)
    if with_estimate:
        _add_estimate(rep, stage, sl, estimate(stage, sl))
    rep.compile_seconds = time.time() - t0
    return rep


# ============================================================================ advice
def _micro_batch(stage: Stage, state_b: float, accum_b: float, temp_b: float,
                 hbm_bytes: float) -> Optional[int]:
    """The largest micro-batch that fits, by the trainer's own rule
    (:func:`regift_jax.training.memory.fitting_micro_batch`) on the preflight's figures."""
    if stage.name != "train" or temp_b <= 0:
        return None
    mem = Memory(arguments=int(state_b), outputs=0, aliased=0, temporaries=int(temp_b), code=0)
    return fitting_micro_batch(mem, int(hbm_bytes), rows=stage.rows // stage.accum,
                               global_batch=stage.rows, batch_shards=stage.batch_shards,
                               accum_bytes=int(accum_b))


def advice(rep: StageReport, stage: Stage, sl: Slice, need: Optional[float]) -> str:
    """Why the stage does not fit and what would (by arithmetic: re-run the preflight to
    confirm)."""
    cap = sl.chip.hbm_bytes * PLAN_FRACTION
    state = (rep.params_gib + rep.opt_state_gib + rep.cache_gib) * GIB
    head = (f"{stage.name}: needs {_fmt(need)} per chip, {sl.accelerator_type} ({sl.topology}) "
            f"chips have {sl.chip.hbm_gib:g} GiB")
    lines = [head, f"  parameters {rep.params_gib:.2f} GiB, optimizer state "
             f"{rep.opt_state_gib:.2f} GiB, KV cache {rep.cache_gib:.2f} GiB per chip"]
    if rep.largest_buffers:
        lines.append("  largest buffers per chip: " + "; ".join(rep.largest_buffers[:4]))
    elif rep.compiler_message:
        lines.append("  compiler: " + rep.compiler_message.splitlines()[0][:300])
    tips = suggestions(stage, sl, state, rep.opt_state_gib * GIB, need, cap)
    lines.extend("  try: " + s for s in tips)
    return "\n".join(lines)


def suggestions(stage: Stage, sl: Slice, state: float, opt_state: float,
                need: Optional[float], cap: float) -> List[str]:
    out = []
    chips = stage.mesh.size
    if state > cap:
        at_least = math.ceil(state * chips / cap)
        out.append(f"shard the weights over more chips: the state alone is {_fmt(state)} per "
                   f"chip over {chips}; at least {at_least} chips at the same split"
                   + (" (--mesh=fsdp=-1 over the slice)" if chips < sl.num_chips else ""))
        return out
    temp = (need or 0.0) - state
    if stage.name == "train":
        if stage.run.remat_policy not in ("full", "nothing_saveable"):
            out.append("--config.model.remat_policy=full (recompute each layer in the backward "
                       "pass instead of keeping its activations)")
        accum_b = 0.0 if stage.accum > 1 else opt_state / 2  # an f32 copy of what trains
        m = _micro_batch(stage, state, accum_b, temp, sl.chip.hbm_bytes)
        if m:
            out.append(f"--config.train.micro_batch={m} ({stage.rows // m} micro-batches "
                       f"accumulated per step; the same optimizer step)")
        if stage.mesh.shape.get("data", 1) > 1:
            out.append("--config.mesh.data=1 --config.mesh.fsdp=-1 (shard the state over every "
                       "chip)")
    else:
        out.append("a smaller batch (batch_size / runtime.batch_size), or shard the batch and "
                   "the KV cache over more chips (--mesh=data=-1 or fsdp=-1)")
    return out or ["a larger slice"]


def _fmt(b: Optional[float]) -> str:
    return "?" if b is None else f"{b / GIB:.2f} GiB"
