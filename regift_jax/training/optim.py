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

import re
from typing import Sequence

import jax
import optax


def path_str(path) -> str:
    """A pytree key path as ``"a/b/c"`` (the form ``optim.no_decay`` regexes are matched on)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, no_decay: Sequence[str]):
    """True where weight decay applies: the path matches none of the ``no_decay`` regexes."""
    pats = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_str(path)) for p in pats), params)


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
        raise ValueError(f"optim.schedule={ocfg.schedule!r}; valid: linear, cosine, constant")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(ocfg, total_steps: int, params):
    """(optax transformation, schedule): clip_by_global_norm -> AdamW with a decay mask.  The
    reported ``grad_norm`` of a step is the norm before clipping."""
    schedule = make_schedule(ocfg, total_steps)
    parts = []
    if float(ocfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                             weight_decay=float(ocfg.weight_decay),
                             mask=decay_mask(params, tuple(ocfg.no_decay))))
    return optax.chain(*parts), schedule
