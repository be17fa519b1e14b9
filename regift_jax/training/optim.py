"""The optimizer: optax AdamW after global-norm clipping, its learning-rate schedule and the
weight-decay mask.

AdamW uses decoupled weight decay scaled by the learning rate (as PyTorch's AdamW).  The schedule
is a linear warmup from 0, then linear / cosine decay to ``end_lr_fraction`` or constant.
Weight decay is masked off for parameters whose path matches ``optim.no_decay`` (default: RMSNorm
scales, biases and the token embedding): decaying a norm scale or a bias towards 0 changes the
function rather than regularising it, and embedding rows of rare tokens would be shrunk at every
step they are not seen.
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Sequence

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")


def path_str(path) -> str:
    """A pytree key path as ``"a/b/c"`` (the form ``optim.no_decay`` regexes are matched on)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, no_decay: Sequence[str]):
    """True where weight decay applies: the path matches none of the ``no_decay`` regexes."""
    pats = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_str(path)) for p in pats), params)


def _problems(ocfg, total_steps: Optional[int]) -> List[str]:
    f = {k: float(getattr(ocfg, k)) for k in ("learning_rate", "warmup_fraction",
                                               "end_lr_fraction", "weight_decay", "b1", "b2",
                                               "eps", "clip_norm")}
    bad = [f"optim.{k}={v} is not a finite number" for k, v in f.items() if not math.isfinite(v)]
    checks = (
        (f["learning_rate"] > 0, f"optim.learning_rate={f['learning_rate']} must be > 0"),
        (f["weight_decay"] >= 0, f"optim.weight_decay={f['weight_decay']} must be >= 0"),
        (0 <= f["b1"] < 1, f"optim.b1={f['b1']} must be in [0, 1)"),
        (0 <= f["b2"] < 1, f"optim.b2={f['b2']} must be in [0, 1)"),
        (f["eps"] > 0, f"optim.eps={f['eps']} must be > 0"),
        (0 <= f["end_lr_fraction"] <= 1,
         f"optim.end_lr_fraction={f['end_lr_fraction']} must be in [0, 1]"),
        (ocfg.schedule in SCHEDULES,
         f"optim.schedule={ocfg.schedule!r}; valid: {', '.join(SCHEDULES)}"),
    )
    bad += [msg for ok, msg in checks if not ok]
    warm = int(ocfg.warmup_steps)
    if warm < 0 and not 0 <= f["warmup_fraction"] <= 1:
        bad.append(f"optim.warmup_fraction={f['warmup_fraction']} must be in [0, 1]")
    if warm >= 0 and total_steps is not None and warm > int(total_steps):
        bad.append(f"optim.warmup_steps={warm} is more than the {int(total_steps)} steps of the "
                   "run")
    return bad


def validate(ocfg, total_steps: Optional[int] = None) -> None:
    """Raise ``ValueError`` listing every unusable optimiser value (learning rate > 0, weight
    decay >= 0, betas in [0, 1), warmup within the ``total_steps`` of the run when known, ...)."""
    bad = _problems(ocfg, total_steps)
    if bad:
        raise ValueError("bad optimiser settings: " + "; ".join(bad))


def make_schedule(ocfg, total_steps: int):
    """Warmup (linear from 0) then ``linear`` / ``cosine`` decay to ``end_lr_fraction`` or
    ``constant``; ``total_steps`` counts optimizer updates."""
    lr = float(ocfg.learning_rate)
    total = max(int(total_steps), 1)
    warm = int(ocfg.warmup_steps) if int(ocfg.warmup_steps) >= 0 else int(
        round(float(ocfg.warmup_fraction) * total))
    warm = min(max(warm, 0), total)
    end = lr * float(ocfg.end_lr_fraction)
    decay_steps = max(total - warm, 1)
    if ocfg.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif ocfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif ocfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={ocfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(ocfg, total_steps: int, params):
    """(optax transformation, schedule): clip_by_global_norm -> AdamW with a decay mask.  The
    reported ``grad_norm`` of a step is the norm before clipping.  Raises ``ValueError`` for
    unusable values (:func:`validate`)."""
    validate(ocfg, total_steps)
    schedule = make_schedule(ocfg, total_steps)
    parts = []
    if float(ocfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                             weight_decay=float(ocfg.weight_decay),
                             mask=decay_mask(params, tuple(ocfg.no_decay))))
    return optax.chain(*parts), schedule
