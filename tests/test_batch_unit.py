"""``data.batch_unit`` (issue 16.4): the paper presets count 32 *examples* per optimizer step
(micro-batches of 16 accumulated twice), so steps per epoch match the released checkpoints; the
default preset keeps packed rows (``tokens``)."""

import os

import numpy as np
import pytest

from regift_jax.core import configs_util
from regift_jax.training import examples, inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "train")
PAPER = ["configs/llama.py:llama3_1_8b", "configs/llama.py:llama3_1_8b_full",
         "configs/mistral.py", "configs/phi4.py", "configs/instruction.py:student=llama3_1_8b"]


def test_paper_size_correct_set_gives_the_released_steps_per_epoch():
    # The released checkpoints: 3,177 optimizer steps per epoch on the correct set (101,664
    # traces) at 32 examples per step; the last, partial step of an epoch counts.
    assert inputs.steps_per_epoch(101_664, 32) == 3_177
    assert inputs.steps_per_epoch(101_665, 32) == 3_178
    assert inputs.steps_per_epoch(31, 32) == 1
    with pytest.raises(ValueError):
        inputs.steps_per_epoch(10, 0)


@pytest.mark.parametrize("spec", PAPER)
def test_paper_presets_count_examples(spec):
    c = configs_util.load_config_file(os.path.join(REPO, spec))
    assert (c.data.batch_unit, c.data.packing, c.train.global_batch) == ("examples", "none", 32)
    # the 32 examples in one micro-batch (the TPU preflight's tuning); same optimizer step
    assert c.train.micro_batch == -1 and inputs.accum_steps(c.train) == 1
    assert c.model.attention_impl == "auto"
    inputs.check_batch_unit(c.data)


def test_default_preset_keeps_packed_rows():
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "llama.py"))
    assert (c.data.batch_unit, c.data.packing, c.train.global_batch) == ("tokens", "first_fit", 4)
    assert inputs.accum_steps(c.train) == 1


def test_batch_settings_are_checked():
    c = configs_util.base_config()
    c.data.batch_unit = "examples"
    with pytest.raises(ValueError, match="set data.packing=none"):
        inputs.check_batch_unit(c.data)
    c.data.batch_unit = "rows"
    with pytest.raises(ValueError, match="valid: tokens, examples"):
        inputs.check_batch_unit(c.data)
    t = c.train
    t.global_batch, t.micro_batch = 32, 12
    with pytest.raises(ValueError, match="not a multiple of train.micro_batch=12"):
        inputs.accum_steps(t)
    t.micro_batch, t.grad_accum_steps = 8, 2
    with pytest.raises(ValueError, match="set one of them"):
        inputs.accum_steps(t)
    t.grad_accum_steps = 4
    assert inputs.accum_steps(t) == 4
    t.micro_batch, t.grad_accum_steps = -1, 2
    assert inputs.accum_steps(t) == 2


def test_examples_unit_puts_global_batch_examples_in_each_step():
    from regift_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(FIXTURES, "tokenizer"))
    c = configs_util.base_config()
    c.data.source, c.data.seq_len = os.path.join(FIXTURES, "traces"), 256
    c.data.batch_unit, c.data.packing = "examples", "none"
    c.train.global_batch, c.train.num_steps, c.train.num_epochs = 8, -1, 2.0
    ex, _ = examples.load_examples(c.data)
    render, _ = inputs.make_render(c.data, tok)
    pipe = inputs.make_pipeline(ex, tok, render, c.data, global_batch=8, seed=0, num_epochs=1,
                                shuffle=True, prefetch=0)
    batches = list(pipe)
    kept = pipe.stats.tokenize.kept
    assert kept == len(ex)  # nothing dropped at 256 tokens
    segments = [int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches]
    assert segments[:-1] == [8] * (len(batches) - 1)  # 8 examples, one per row, per step
    assert all(np.all(b["segment_ids"] <= 1) for b in batches)
    assert sum(segments) == kept
    total, per_epoch = inputs.total_steps(c, ex, tok, render)
    assert per_epoch == len(batches) == inputs.steps_per_epoch(kept, 8)
    assert total == 2 * per_epoch
