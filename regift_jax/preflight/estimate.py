"""An ESTIMATED step time for a stage, from XLA's TPU cost model, seeing the whole step.

XLA's ``cost_analysis()`` counts a loop body once, whatever its trip count, and gives no time
(a negative ``optimal_seconds``) for the train step's layer loops; the decoder runs its layers
in a ``lax.scan``.  So the step is costed from shallow variants of the same program, compiled for
the same topology and mesh (:meth:`regift_jax.preflight.programs.Stage.build`):

* ``c0`` (no layer: embedding, final norm, LM head and loss, the optimizer update of what sits
  outside the layers) and ``c1`` (one layer; XLA removes a loop of one trip, so the program is
  straight-line and XLA times it);
* the train step and the scorer also compile ``c2`` (two layers): the layer loop survives and
  its body, counted once, is a layer as every layer runs it (at one layer XLA merges the remat
  policy's recomputation with the forward pass, and prunes the last layer's work that the
  scorer's few scored positions do not need).  One layer's FLOPs, bytes and collectives are
  ``c2 - c0`` less, for training, two optimizer updates of a layer's weights (AdamW in float32,
  counted analytically: ``UPDATE_FLOPS`` and ``UPDATE_BYTES`` per parameter; the updates run
  outside the loop); its time is XLA's time of ``c1 - c0`` scaled by the FLOP ratio of the two
  (the recomputation at the layer's own rate).  With LoRA the no-layer variant trains the final
  norm's scale, so that the LM head's input gradient, which every real step needs, is
  computed.  Prefill and decode take one layer as ``c1 - c0``;
* the train step's LM head and loss run in a loop over chunks of ``model.loss_chunk``
  positions, as many as hold a loss: the no-layer variant is compiled once more with the chunk
  doubled, the difference is one chunk, and the ends get ``chunks - 1`` more, counting a loss on
  every slot (an upper bound);
* the sampler's decode loop (its length depends on the data) is avoided: the decode step is
  costed as the sampler's ``extend`` of one token per row into a full cache, prefill as
  ``extend`` of the prompts into an empty one (a KV cache of no layers cannot be traced, so the
  variants carry one layer of cache at least).  Without a layer loop XLA keeps the
  prefill's LM head on every prompt position, where the real prefill computes it for the last
  one only (a few percent of a prefill, counted in full);
* the step = ends + L x layer (+ L optimizer updates), with ``grad_accum_steps`` x the
  micro-batch part for the train step (costing variants run one micro-batch).

Costing compiles switch off XLA's windowed einsum (collective matmul), which turns a sharded
matmul into a loop of its own; the collectives then appear as such.  Times per chip:

* ``step_seconds``: XLA's own ``optimal_seconds`` of the pieces (its TPU model, collectives
  included as it models them), where it gives one, else the bound below;
* ``bound_seconds``: max(FLOPs / bf16 peak, bytes / HBM bandwidth) plus every collective's bytes
  over half the chip's bidirectional ICI bandwidth (a ring on one torus axis), with no overlap: a
  cross-check, not an upper bound (XLA's "bytes accessed" counts operands as if every operation
  read them from HBM, yet XLA's own model, which times each fusion on the chip's units, comes out
  above it for some steps).

The FLOPs of the whole step (per chip x chips) are checked against the analytic count of what
the program executes (:func:`regift_jax.preflight.programs.train_executed_flops` and friends);
XLA's count includes element-wise work, so it sits slightly above.  Not seen: the host input
pipeline, real interconnect contention and topology, collectives overlapping compute (XLA's
latency-hiding scheduler), and kernels opaque to the cost model (custom calls).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Tuple

from regift_jax.preflight import compiled as comp
from regift_jax.preflight.hardware import Slice
from regift_jax.preflight.programs import Stage

#: Compiler options of the costing variants (see the module docstring).
COSTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                   "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
#: The FLOP check's tolerance (XLA's count over the analytic one).
FLOP_TOLERANCE = 0.05
#: AdamW on a float32 parameter after global-norm clipping, per parameter: FLOPs, and HBM bytes
#: (read parameter, gradient and both moments, write parameter and moments; the norm, the clip
#: and the non-finite guard read the gradient and both states once more).
UPDATE_FLOPS = 20.0
UPDATE_BYTES = 48.0

#: The fraction of the chip's peak assumed for the splash attention kernel, which XLA's cost
#: model cannot time (an assumption, not a measurement: flash-style kernels on TPU run well
#: below peak at head_dim 128).
KERNEL_EFFICIENCY = 0.5
KERNEL_NOTE = ("custom TPU kernels (Pallas) are opaque to XLA's cost model: the attention they "
               "compute is added analytically, its FLOPs counted and its time ASSUMED at "
               f"{KERNEL_EFFICIENCY:.0%} of the chip's bf16 peak")
METHOD = ("ESTIMATE: XLA's TPU cost model (optimal_seconds) of the step's pieces compiled for "
          "this topology and mesh at shallow depths (0 and 1 layers, and 2 for the train "
          "step's remat recomputation), multiplied out: ends + L x layer + optimizer updates "
          "(analytic), x grad_accum_steps, LM-head loss chunks x their count (a loss on every "
          "slot); decode: one extend step; not seen: host input, real ICI contention, "
          "compute/communication overlap, kernels opaque to the cost model")


@dataclasses.dataclass
class Piece:
    """One piece of a step: its cost per chip and its estimated time."""
    cost: comp.Cost
    seconds: float


@dataclasses.dataclass
class Estimate:
    """The whole step per chip: its cost, estimated times and the FLOP check."""
    cost: comp.Cost
    step_seconds: float
    bound_seconds: float
    xla_flops_total: float  # per chip x chips
    analytic_flops: float
    pieces: Dict[str, Piece]
    warnings: List[str]

    @property
    def flop_ratio(self) -> float:
        return self.xla_flops_total / self.analytic_flops if self.analytic_flops else math.nan

    @property
    def flop_check_ok(self) -> bool:
        return abs(self.flop_ratio - 1.0) <= FLOP_TOLERANCE


def _costed(stage: Stage, num_layers: int, **kw) -> comp.Cost:
    """The cost of a costing variant; a Pallas kernel (opaque to the cost model) is noted."""
    exe = stage.build(num_layers, True, **kw).lowered.compile(compiler_options=COSTING_OPTIONS)
    kernels = exe.as_text().count('custom_call_target="tpu_custom_call"')
    if kernels and not any(KERNEL_NOTE in n for n in stage.notes):
        stage.notes.append(f"{KERNEL_NOTE}: {kernels} in the {num_layers}-layer variant")
    return comp.cost(exe, stage.mesh.size)


def bound_seconds(cost: comp.Cost, sl: Slice) -> float:
    """Roofline (FLOPs at peak, bytes at HBM bandwidth) plus collectives at ICI bandwidth."""
    compute = max(cost.flops / sl.chip.peak_flops, cost.bytes / sl.chip.hbm_bytes_per_s)
    return compute + cost.moved_bytes / (sl.chip.ici_bytes_per_s / 2.0)


def _timed(cost: comp.Cost, sl: Slice, xla: float, warnings: List[str], what: str) -> Piece:
    """XLA's time of a piece, unless it has none or one faster than the chip's peak FLOP rate
    allows (then the bound, with a warning)."""
    if math.isfinite(xla) and xla >= 0.95 * cost.flops / sl.chip.peak_flops and xla > 0:
        return Piece(cost, xla)
    warnings.append(f"XLA gave no usable time for the {what}; its bound (roofline + "
                    f"collectives at ICI bandwidth) is used")
    return Piece(cost, bound_seconds(cost, sl))


def _update(stage: Stage, sl: Slice, params: float) -> Piece:
    """The optimizer update of ``params`` trainable parameters (all chips), per chip."""
    p = params / stage.mesh.size
    cost = comp.Cost(flops=UPDATE_FLOPS * p, bytes=UPDATE_BYTES * p)
    cost.xla_seconds = bound_seconds(cost, sl)  # memory-bound: its roofline is its time
    return Piece(cost, cost.xla_seconds)


def pieces(stage: Stage, sl: Slice) -> Tuple[Dict[str, Piece], List[str]]:
    """``{"ends", "layer", "update", "end_update"}`` of one micro-batch (the updates once per
    step) and warnings."""
    warnings: List[str] = []
    c0, c1 = _costed(stage, 0), _costed(stage, 1)
    ends = c0
    if stage.head_chunks > 1:  # the LM-head loss loop runs head_chunks times, counted once
        chunk = _costed(stage, 0, chunk_scale=2).minus(c0)
        ends = c0.plus(chunk.scaled(stage.head_chunks - 1))
    upd = _update(stage, sl, stage.layer_params)
    one = c1.minus(c0).minus(upd.cost)
    layer = one
    if stage.layer_depth == 2:
        layer = _costed(stage, 2).minus(c0).minus(upd.cost.scaled(2.0))
    xla = one.xla_seconds * layer.flops / one.flops if one.flops > 0 else math.nan
    timed = _timed(layer, sl, xla, warnings, "layer")
    if stage.kernel_layer_flops and any(KERNEL_NOTE in n for n in stage.notes):
        k = stage.kernel_layer_flops / stage.mesh.size  # per chip, at the assumed efficiency
        timed = Piece(layer.plus(comp.Cost(flops=k)),
                      timed.seconds + k / (KERNEL_EFFICIENCY * sl.chip.peak_flops))
    return {"ends": _timed(ends, sl, ends.xla_seconds, warnings, "program without layers"),
            "layer": timed, "update": upd,
            "end_update": _update(stage, sl, stage.end_params)}, warnings


def estimate(stage: Stage, sl: Slice) -> Estimate:
    """The step of ``stage`` on ``sl``, estimated (see the module docstring)."""
    parts, warnings = pieces(stage, sl)
    L, k = stage.cfg.num_layers, stage.accum
    end_upd, upd, ends, layer = (parts[n] for n in ("end_update", "update", "ends", "layer"))
    micro_cost = ends.cost.minus(end_upd.cost).plus(layer.cost.scaled(L))
    micro_s = ends.seconds - end_upd.seconds + L * layer.seconds
    total = end_upd.cost.plus(upd.cost.scaled(L)).plus(micro_cost.scaled(k))
    step = end_upd.seconds + L * upd.seconds + k * micro_s
    return Estimate(total, step, bound_seconds(total, sl), total.flops * stage.mesh.size,
                    stage.executed_flops(L) * k, parts, warnings)
