"""The trainer's memory check (regift_jax.training.memory): figures from a real compiled step
on CPU, the refusal and what it suggests.  The trainer-level check is in tests/test_trainer.py
(``test_memory_check_refuses_a_step_that_does_not_fit``)."""

import jax
import jax.numpy as jnp
import pytest

from regift_jax.core.memory import Memory, device_limit, memory
from regift_jax.training import memory as M

GIB = 1024 ** 3


def test_memory_reads_the_compiled_program():
    f = jax.jit(lambda x, y: jnp.tanh(x @ y))
    s = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    mem = memory(f.lower(s, s).compile())
    assert mem.arguments == 2 * 256 * 256 * 4 and mem.outputs == 256 * 256 * 4
    assert mem.total >= mem.arguments + mem.outputs - mem.aliased
    assert device_limit(jax.devices()[0]) is None  # the CPU reports no memory limit


def _mem(state_gib, temp_gib):
    return Memory(arguments=int(state_gib * GIB), outputs=0, aliased=0,
                  temporaries=int(temp_gib * GIB), code=0)


def test_a_step_that_fits_passes_with_its_figures():
    line = M.check(_mem(4, 8), 16 * GIB, rows=16, global_batch=32, batch_shards=4,
                   accum_bytes=GIB, remat_policy="none")
    assert "12.00 GiB per device of 16.00" in line and "micro-batch 16 rows" in line


def test_too_many_activations_suggest_the_largest_micro_batch_that_fits():
    # 4 GiB of state, 24 GiB of activations for 16 rows (1.5 per row), 16 GiB devices, 1 GiB
    # more for the gradient accumulator: 0.9 * 16 - 5 = 9.4 GiB leaves 6 rows; 32 % 6 != 0 and
    # 6 % 4 != 0, so 4 rows.
    with pytest.raises(M.StepMemoryError) as e:
        M.check(_mem(4, 24), 16 * GIB, rows=16, global_batch=32, batch_shards=4,
                accum_bytes=GIB, remat_policy="none")
    msg = str(e.value)
    assert "28.00 GiB per device of 16.00" in msg
    assert "--config.train.micro_batch=4 (8 micro-batches" in msg
    assert "--config.model.remat_policy=full" in msg
    assert M.fitting_micro_batch(_mem(4, 24), 16 * GIB, rows=16, global_batch=32,
                                 batch_shards=1, accum_bytes=GIB) == 4  # 6 and 5 do not divide
    assert M.fitting_micro_batch(_mem(4, 24), 16 * GIB, rows=16, global_batch=48,
                                 batch_shards=1, accum_bytes=GIB) == 6


def test_a_state_that_cannot_fit_asks_for_more_shards():
    with pytest.raises(M.StepMemoryError, match="shard the state over more devices"):
        M.check(_mem(15, 2), 16 * GIB, rows=16, global_batch=32, batch_shards=1,
                accum_bytes=0, remat_policy="full")
