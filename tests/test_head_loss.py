"""Chunked LM head + cross-entropy on the loss positions: values and gradients equal the plain
full-logits loss (training.step.token_loss), tied and untied heads, any chunk size, empty masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regift_jax.models.head_loss import head_loss
from regift_jax.training.step import token_loss

B, T, D, V = 3, 37, 16, 101


def _inputs(seed=0, p_loss=0.3):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    m = jnp.asarray(rng.random((B, T)) < p_loss, jnp.int32)
    return h, w, t, m


def _reference(h, w, t, m, vocab_major=True):
    logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", h, w)
    return token_loss(logits, t, m)


@pytest.mark.parametrize("chunk", [1, 7, 32, 512])
@pytest.mark.parametrize("vocab_major", [True, False])
def test_values_and_gradients_equal_full_logits(chunk, vocab_major):
    h, w, t, m = _inputs()
    if not vocab_major:
        w = w.T  # an untied lm_head [D, V]
    ref = _reference(h, w, t, m, vocab_major)
    got = jax.jit(lambda h, w: head_loss(h, w, t, m, chunk=chunk, vocab_major=vocab_major))(h, w)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    assert float(got[1]) == float(ref[1]) == float(m.sum())
    assert float(got[2]) == float(ref[2])
    g_ref = jax.grad(lambda h, w: _reference(h, w, t, m, vocab_major)[0], argnums=(0, 1))(h, w)
    g_new = jax.jit(jax.grad(lambda h, w: head_loss(h, w, t, m, chunk=chunk,
                                                    vocab_major=vocab_major)[0],
                             argnums=(0, 1)))(h, w)
    for a, b in zip(g_new, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


def test_only_loss_positions_matter():
    """Hidden states and targets of positions without loss get zero gradient and change nothing."""
    h, w, t, m = _inputs(seed=1)
    f = jax.jit(lambda h, t: head_loss(h, w, t, m, chunk=8)[0])
    gh = np.asarray(jax.grad(f)(h, t))
    off = ~np.asarray(m, bool)
    assert np.all(gh[off] == 0) and np.any(gh[~off] != 0)
    h2 = jnp.where(jnp.asarray(off)[..., None], 100.0, h)
    t2 = jnp.where(jnp.asarray(off), (t + 5) % V, t)
    assert float(f(h2, t2)) == float(f(h, t))


def test_empty_mask_gives_zero_loss_and_gradient():
    h, w, t, m = _inputs()
    z = jnp.zeros_like(m)
    s, n, c = head_loss(h, w, t, z, chunk=8)
    assert (float(s), float(n), float(c)) == (0.0, 0.0, 0.0)
    g = jax.grad(lambda h: head_loss(h, w, t, z, chunk=8)[0])(h)
    assert float(jnp.abs(g).max()) == 0.0


def test_value_and_grad_with_aux_and_frozen_head():
    """The trainer's use: value_and_grad w.r.t. the hidden states only (a frozen, LoRA-style
    head), the count and accuracy as aux; also bfloat16 compute stays close."""
    h, w, t, m = _inputs(seed=2)

    def fn(h, dtype):
        s, n, c = head_loss(h, w, t, m, chunk=16, dtype=dtype)
        return s, (n, c)
    (s, (n, c)), g = jax.jit(lambda h: jax.value_and_grad(fn, has_aux=True)(h, "float32"))(h)
    ref = _reference(h, w, t, m)
    np.testing.assert_allclose(float(s), float(ref[0]), rtol=1e-6)
    assert float(n) == float(ref[1]) and float(c) == float(ref[2])
    (s16, _), g16 = jax.value_and_grad(fn, has_aux=True)(h, "bfloat16")
    np.testing.assert_allclose(float(s16), float(s), rtol=2e-2)
    assert float(jnp.abs(g16 - g).max()) < 0.05 * float(jnp.abs(g).max())


def test_bad_chunk_is_a_clear_error():
    h, w, t, m = _inputs()
    with pytest.raises(ValueError, match="chunk must be positive"):
        head_loss(h, w, t, m, chunk=0)


def test_sharded_per_batch_shard_equals_unsharded():
    """On a mesh (decoder.trace_context) the chunk loop runs per batch shard in shard_map: the
    loss, the counts and the gradients of the hidden states and of both head layouts (tied
    [V, D], untied [D, V]) equal the unsharded loss, on data=2 x fsdp=2 and on fsdp=2 x tensor=2
    (4 simulated CPU devices); the compiled program all-reduces no [chunk, V] logits."""
    import os
    import subprocess
    import sys
    import textwrap
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(repo, "tests")!r})
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from test_head_loss import _inputs
        from regift_jax.core import sharding as shd
        from regift_jax.models.decoder import trace_context
        from regift_jax.models.head_loss import head_loss
        from regift_jax.models.run_config import RunConfig
        assert jax.device_count() == 4
        h, w, t, m = _inputs(p_loss=0.4)
        h, t, m = h[:2].repeat(2, 0), t[:2].repeat(2, 0), m[:2].repeat(2, 0)  # 4 rows
        m = m.at[3].set(0)  # a shard whose rows hold no loss position
        for shape in ({{"data": 2, "fsdp": 2}}, {{"fsdp": 2, "tensor": 2}}):
            mesh = shd.make_mesh(shape)
            for vocab_major in (True, False):
                wv = w if vocab_major else w.T
                names = ("vocab", "embed") if vocab_major else ("embed", "vocab")
                wsh = NamedSharding(mesh, shd.logical_to_spec(names, wv.shape, mesh))
                bsh = shd.batch_sharding(mesh)
                f = lambda h, w: head_loss(h, w, t, m, chunk=5, vocab_major=vocab_major)
                g = lambda h, w: jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1))(h, w)
                ref, gref = jax.jit(f)(h, wv), jax.jit(g)(h, wv)
                hs, ws = jax.device_put(h, bsh), jax.device_put(wv, wsh)
                with trace_context(mesh, RunConfig()):
                    text = jax.jit(g).lower(hs, ws).compile().as_text()
                    got, ggot = jax.jit(f)(hs, ws), jax.jit(g)(hs, ws)
                for a, b in zip(got, ref):
                    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
                for a, b in zip(ggot, gref):
                    assert a.shape == b.shape
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5,
                                               rtol=1e-5)
                assert ggot[1].sharding.is_equivalent_to(wsh, 2), (ggot[1].sharding, wsh)
                chunk_logits = [l for l in text.splitlines()  # f32[5,101]: one chunk's logits
                                if "all-reduce(" in l and "[5,101]" in l]
                assert not chunk_logits, chunk_logits
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=repo, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
