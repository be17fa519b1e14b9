"""Training inputs: examples rendered with the training prompt, tokenized, packed and batched by
the streaming pipeline (:class:`regift_jax.data.pipeline.SFTPipeline`), and the cached held-out
batches of the evaluation loss."""

from __future__ import annotations

import logging
import math
from typing import List, Optional

import jax
import numpy as np

from regift_jax.core import prompts
from regift_jax.data.packing import FIELDS
from regift_jax.data.pipeline import SFTPipeline, make_trace_render
from regift_jax.training.hosts import host_max, host_min

log = logging.getLogger(__name__)

#: What ``train.global_batch`` counts (``data.batch_unit``).
BATCH_UNITS = ("tokens", "examples")


def check_batch_unit(dcfg) -> None:
    """``data.batch_unit``: ``tokens`` (packed rows of ``seq_len`` tokens) or ``examples`` (one
    example per row, so ``packing`` must be ``none``)."""
    if dcfg.batch_unit not in BATCH_UNITS:
        raise ValueError(f"data.batch_unit={dcfg.batch_unit!r}; valid: {', '.join(BATCH_UNITS)}")
    if dcfg.batch_unit == "examples" and dcfg.packing != "none":
        raise ValueError(f"data.batch_unit=examples puts one example in each row, but "
                         f"data.packing={dcfg.packing!r}: set data.packing=none (packing serves "
                         "data.batch_unit=tokens)")


def accum_steps(tcfg) -> int:
    """Micro-batches per optimizer step: ``global_batch / micro_batch`` when
    ``train.micro_batch > 0``, else ``train.grad_accum_steps``."""
    gb, k, mb = int(tcfg.global_batch), int(tcfg.grad_accum_steps), int(tcfg.micro_batch)
    if mb <= 0:
        return k
    if gb % mb:
        raise ValueError(f"train.global_batch={gb} is not a multiple of train.micro_batch={mb}")
    if k not in (1, gb // mb):
        raise ValueError(f"train.micro_batch={mb} gives {gb // mb} micro-batches but "
                         f"train.grad_accum_steps={k}: set one of them")
    return gb // mb


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Optimizer steps of one epoch with ``data.batch_unit = "examples"``: ``num_examples`` at
    ``global_batch`` examples per step, the last partial step included (the paper's 101,664
    correct traces at 32 per step: 3,177)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch={global_batch} must be > 0")
    return -(-int(num_examples) // int(global_batch))


def make_render(dcfg, tokenizer):
    """(render ``example -> (prompt, response pieces)``, template id) of ``data.template``."""
    tmpl = prompts.get_template(dcfg.template)
    if tmpl.target_text is None:
        raise ValueError(f"data.template={dcfg.template!r} is an evaluation prompt (no target)")
    if tuple(tmpl.required_fields) != ("context", "question"):
        raise ValueError(f"data.template={dcfg.template!r} needs fields {tmpl.required_fields}; "
                         "training templates take context and question")

    def prompt_fn(r):  # the text of prompts.encode_prompt's rule; the tokenizer adds the BOS
        body = tmpl.render_prompt(include_prefill=False, context=r["context"],
                                  question=r["question"])
        return prompts.prompt_text(tokenizer, body, chat=bool(dcfg.chat_template),
                                   prefill=tmpl.prefill)

    reasoning_key = "reasoning" if "reasoning" in tmpl.target_fields else None
    return make_trace_render(prompt_fn, response_template=tmpl.target_text,
                             reasoning_key=reasoning_key), tmpl.id


def make_pipeline(examples, tokenizer, render, dcfg, *, global_batch: int, seed: int,
                  num_epochs: Optional[int], shuffle: bool, prefetch: int,
                  drop_remainder: bool = False) -> SFTPipeline:
    """The pipeline over ``examples`` with the ``data`` section's tokenization and packing."""
    add_bos = {"": None, "true": True, "false": False}.get(str(dcfg.add_bos).lower())
    if add_bos is None and str(dcfg.add_bos) != "":
        raise ValueError(f"data.add_bos={dcfg.add_bos!r}; valid: '', 'true', 'false'")
    kw = {}
    if str(dcfg.boundary) != "auto":
        kw["boundary"] = dcfg.boundary
    pad = getattr(tokenizer, "pad_token_id", None)
    return SFTPipeline(examples, tokenizer, render, seq_len=int(dcfg.seq_len),
                       global_batch=global_batch, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, packing=dcfg.packing,
                       max_open_rows=int(dcfg.max_open_rows),
                       epoch_boundary=dcfg.epoch_boundary, drop_remainder=drop_remainder,
                       overlong=dcfg.overlong, add_bos=add_bos, add_eos=bool(dcfg.add_eos),
                       pad_id=int(pad) if pad is not None else 0,
                       tokenize_chunk=int(dcfg.tokenize_chunk), prefetch=prefetch, **kw)


def total_steps(config, train_ex, tokenizer, render):
    """(steps to run, steps per epoch or None): ``train.num_steps`` when > 0, else
    ``ceil(num_epochs x steps_per_epoch)`` with the batches of one epoch counted (the fewest of
    any process, so every process runs the same number of steps): packed batches, or with
    ``data.batch_unit = "examples"`` :func:`steps_per_epoch` of the examples kept by
    tokenization."""
    if int(config.train.num_steps) > 0:
        return int(config.train.num_steps), None
    counter = make_pipeline(train_ex, tokenizer, render, config.data,
                            global_batch=int(config.train.global_batch), seed=int(config.seed),
                            num_epochs=1, shuffle=bool(config.data.shuffle), prefetch=0)
    n_batches = sum(1 for _ in counter)
    if config.data.batch_unit == "examples":
        n_batches = steps_per_epoch(counter.stats.tokenize.kept, counter.local_batch)
    per_epoch = host_min(n_batches)
    total = max(1, int(math.ceil(float(config.train.num_epochs) * per_epoch)))
    log.info("%d steps per epoch x %s epochs = %d steps (%s per step: %d)", per_epoch,
             config.train.num_epochs, total, config.data.batch_unit, config.train.global_batch)
    return total, per_epoch


def eval_batches(eval_ex, tokenizer, render, config) -> List[dict]:
    """The held-out batches of this process, cached; every process gets the same count (short
    ones are padded with empty batches, which contribute nothing)."""
    if not eval_ex:
        return []
    gb = int(config.train.global_batch)
    nproc, pid = jax.process_count(), jax.process_index()
    local = []
    if eval_ex[pid::nproc]:
        pipe = make_pipeline(eval_ex, tokenizer, render, config.data, global_batch=gb,
                             seed=int(config.seed), num_epochs=1, shuffle=False, prefetch=0)
        local = list(pipe)
    n = host_max(len(local))
    if int(config.eval.max_batches) > 0:
        n = min(n, int(config.eval.max_batches))
    L = int(config.data.seq_len)
    empty = {f: np.zeros((gb // nproc, L), np.int32) for f in FIELDS}
    return (local + [empty] * n)[:n]
