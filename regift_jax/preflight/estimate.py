"""An ESTIMATED step time for a stage, from XLA's TPU cost model, seeing the whole step.

XLA's ``cost_analysis()`` counts a loop body once, and the decoder runs its layers in a
``lax.scan`` (the train step also loops over micro-batches and, in the loss, over LM-head
chunks; a decode chunk loops over steps).  So the step is costed from shallow variants of the
same program, compiled for the same topology and mesh (:class:`regift_jax.preflight.programs.
Stage.build`), whose loops each run the body once:

* train: ``c0``, no layer (embedding, final norm, LM head and loss, the optimizer update of what
  sits outside the layers), ``c2`` and ``c3``, two and three layers.  The layer loop's body is
  counted once in both, the optimizer update of the stacked layer weights (outside the loop)
  two and three times, so ``c3 - c2`` is one layer's optimizer update and
  ``c2 - c0 - 2 (c3 - c2)`` one layer's forward and backward (with the remat policy's
  recomputation; at one layer XLA removes the loop and merges the recomputation with the
  forward pass, hence no depth 1).  With LoRA the no-layer variant trains the final norm's
  scale, so that the LM head's input gradient, which every real step needs, is computed;
* inference (prefill, decode, scoring): ``c1`` and ``c2``, one layer and two (a KV cache cannot
  have none); ``c2 - c1`` is one layer;
* the step = ends + L x layer, with ``grad_accum_steps`` x the micro-batch part for the train
  step; costing variants run one micro-batch and one LM-head chunk holding every slot (the
  loss on every slot: an upper bound), so no other loop hides trips.

Costing compiles switch off XLA's windowed einsum (collective matmul), which turns a sharded
matmul into a loop of its own; the collectives then appear as such.  Times per chip:

* ``step_seconds``: the sum of XLA's own ``optimal_seconds`` over the pieces (its TPU model,
  collectives included as it models them);
* ``bound_seconds``: max(FLOPs / bf16 peak, bytes / HBM bandwidth) plus every collective's bytes
  over half the chip's bidirectional ICI bandwidth (a ring on one torus axis), with no overlap;
  used as the step time when XLA gives no figure.

The FLOPs of the whole step (per chip x chips) are checked against the analytic count of what
the program executes (:func:`regift_jax.preflight.programs.train_executed_flops` and friends);
XLA's count includes element-wise work, so it sits slightly above.  Not seen: the host input
pipeline, real interconnect contention and topology, collectives overlapping compute (XLA's
latency-hiding scheduler), and kernels opaque to the cost model (custom calls).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List

from regift_jax.preflight import compiled as comp
from regift_jax.preflight.hardware import Slice
from regift_jax.preflight.programs import Stage

#: Compiler options of the costing variants (see the module docstring).
COSTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                   "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
#: The FLOP check's tolerance (XLA's count over the analytic one).
FLOP_TOLERANCE = 0.05

METHOD = ("ESTIMATE: XLA's TPU cost model (optimal_seconds) of the step's pieces compiled "
          "straight-line for this topology and mesh (no layer, two and three layers), loops "
          "multiplied out: ends + L x layer (+ optimizer), x grad_accum_steps; the loss on every "
          "slot; not seen: host input, real ICI contention, compute/communication overlap, "
          "kernels opaque to the cost model")


@dataclasses.dataclass
class Estimate:
    """The whole step per chip: its cost, estimated times and the FLOP check."""
    cost: comp.Cost
    step_seconds: float
    bound_seconds: float
    compute_seconds: float
    collective_seconds: float
    xla_flops_total: float  # per chip x chips
    analytic_flops: float
    pieces: Dict[str, comp.Cost]
    warnings: List[str]

    @property
    def flop_ratio(self) -> float:
        return self.xla_flops_total / self.analytic_flops if self.analytic_flops else math.nan

    @property
    def flop_check_ok(self) -> bool:
        return abs(self.flop_ratio - 1.0) <= FLOP_TOLERANCE


def _costed(stage: Stage, num_layers: int):
    lowered = stage.build(num_layers, True).lowered
    exe = lowered.compile(compiler_options=COSTING_OPTIONS)
    return comp.cost(exe, stage.mesh.size), exe.as_text().count(" while(")


def pieces(stage: Stage) -> tuple:
    """``({"ends", "layer", "layer_update"}: Cost, warnings)`` of one micro-batch."""
    if not stage.per_layer_outside_loops:
        return _inference_pieces(stage)
    warnings = []
    c0, w0 = _costed(stage, 0)
    c2, w2 = _costed(stage, 2)
    c3, w3 = _costed(stage, 3)
    update = c3.minus(c2)
    if w3 != w2 or w2 <= w0:
        warnings.append("the costing programs' loops are not as expected (a layer loop unrolled "
                        "or split); the per-layer figures are unreliable")
    layer = c2.minus(c0).minus(update.scaled(2.0))
    return {"ends": c0, "layer": layer, "layer_update": update}, warnings


def _inference_pieces(stage: Stage) -> tuple:
    """Inference holds no per-layer work outside the layer loop.  One layer (the loop removed)
    and two (the body counted once) give the layer as their difference; a KV cache of no layers
    cannot be traced, hence no depth 0."""
    c1, _ = _costed(stage, 1)
    c2, w2 = _costed(stage, 2)
    layer = c2.minus(c1)
    warnings = [] if w2 else ["the two-layer costing program has no loop; the per-layer "
                              "figures are unreliable"]
    return {"ends": c1.minus(layer), "layer": layer, "layer_update": comp.Cost()}, warnings


def _seconds(cost: comp.Cost, sl: Slice) -> tuple:
    compute = max(cost.flops / sl.chip.peak_flops, cost.bytes / sl.chip.hbm_bytes_per_s)
    collective = cost.moved_bytes / (sl.chip.ici_bytes_per_s / 2.0)
    return compute, collective


def estimate(stage: Stage, sl: Slice) -> Estimate:
    """The step of ``stage`` on ``sl``, estimated (see the module docstring)."""
    parts, warnings = pieces(stage)
    L, k = stage.cfg.num_layers, stage.accum
    end_update = parts["layer_update"].scaled(stage.end_param_ratio)
    micro = parts["ends"].minus(end_update).plus(parts["layer"].scaled(L))
    total = end_update.plus(parts["layer_update"].scaled(L)).plus(micro.scaled(k))
    compute, collective = _seconds(total, sl)
    bound = compute + collective
    xla = total.xla_seconds
    step = xla if math.isfinite(xla) and xla > 0 else bound
    if not (math.isfinite(xla) and xla > 0):
        warnings.append("XLA gave no step time for a piece; the bound (roofline + collectives "
                        "at ICI bandwidth) is used")
    return Estimate(total, step, bound, compute, collective, total.flops * stage.mesh.size,
                    stage.executed_flops(L) * k, parts, warnings)
