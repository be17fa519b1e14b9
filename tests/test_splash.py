"""attention_impl="splash": the Pallas TPU splash-attention kernel equals the decoder's einsum
attention (values and gradients) on CPU in Pallas interpret mode, with causal, sliding-window and
packed-segment masks and left padding, at lengths that are not a multiple of the kernel block; and
a tiny decoder's forward+backward with the real (not interpreted) kernel compiles for a v5e:2x2
TPU slice (libtpu's compiler, no TPU attached)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regift_jax.core import sharding as shd
from regift_jax.models import splash
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import (Decoder, _attend, init_params, mask_bias, param_shardings,
                                       positions_from_mask)
from regift_jax.models.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8)


def packed_batch(B=2, T=33, seed=0):
    """ids, positions, segment ids: row 0 packs two sequences (segments 1, 2), row 1 is
    left-padded by 5 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, TINY.vocab_size, (B, T))
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0
    pos = np.array(positions_from_mask(jnp.asarray(mask)))
    seg = mask.copy()
    seg[0, 20:] = 2
    pos[0, 20:] = np.arange(T - 20)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


def test_block_size_and_refusals():
    assert [splash.block_size(t) for t in (2, 33, 128, 200, 1000, 1024, 8192)] == [
        128, 128, 128, 256, 512, 512, 512]
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="block 100 is not a multiple of 128"):
        splash.splash_attention(q, q, q, jnp.ones((1, 8), jnp.int32), block=100)


def test_attention_impl_splash_is_validated():
    assert RunConfig(attention_impl="splash").attention_impl == "splash"
    with pytest.raises(ValueError, match="valid: einsum, xla, cudnn, splash"):
        RunConfig(attention_impl="flash")


@pytest.mark.parametrize("window", [None, 50])
def test_kernel_equals_einsum_attention(window):
    """Over two 128-token blocks (200 tokens padded to 256), GQA, three packed segments and a
    left-padded row: outputs on real tokens and the q/k/v gradients equal the einsum path."""
    B, T, H, KV, hd = 2, 200, 4, 2, 16
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(B, T, n, hd), jnp.float32) for n in (H, KV, KV))
    seg = np.ones((B, T), np.int32)
    seg[0, 90:] = 2
    seg[0, 150:] = 3
    seg[1, :7] = 0
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in set(seg[b]):
            idx = np.flatnonzero(seg[b] == s)
            pos[b, idx] = np.arange(len(idx))
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    real = (seg > 0)[..., None, None]

    def einsum(q, k, v):
        bias = mask_bias(pos, seg, pos, seg, window)
        return _attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), bias, jnp.float32)

    def kernel(q, k, v):
        return splash.splash_attention(q, k, v, seg, window, block=128)

    def loss(f):
        return lambda *a: jnp.sum(jnp.where(real, f(*a), 0.0) ** 2)
    a, b = einsum(q, k, v), jax.jit(kernel)(q, k, v)
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_allclose(np.asarray(jnp.where(real, b, 0)),
                               np.asarray(jnp.where(real, a, 0)), atol=2e-6)
    ga = jax.grad(loss(einsum), argnums=(0, 1, 2))(q, k, v)
    gb = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_decoder_splash_same_values_and_gradients(window):
    """The decoder with attention_impl="splash" equals "einsum": logits on real tokens and every
    parameter gradient on a packed + left-padded batch of 33 tokens (padded to one 128 block),
    with and without a sliding window shorter than the rows; and on plain causal rows."""
    cfg = TINY.replace(sliding_window=window)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids, pos, seg = packed_batch()

    def loss(p, run):
        out = Decoder(cfg, run).apply({"params": p}, ids, positions=pos, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, out, 0.0) ** 2) * 1e-3, out
    grad = jax.value_and_grad(loss, has_aux=True)
    splash_run = RunConfig(attention_impl="splash")
    (_, a), ga = jax.jit(grad, static_argnums=1)(params, RunConfig())
    (_, b), gb = jax.jit(grad, static_argnums=1)(params, splash_run)
    valid = np.asarray(seg) > 0
    assert np.isfinite(np.asarray(b)).all()
    assert float(np.abs(np.asarray(a) - np.asarray(b))[valid].max()) <= 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-4)
    c = jax.jit(Decoder(cfg).apply)({"params": params}, ids)
    d = jax.jit(Decoder(cfg, splash_run).apply)({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(d), np.asarray(c), atol=1e-5)


def test_sharded_splash_equals_einsum_on_4_devices():
    """Under ``jax.set_mesh`` (decoder.trace_context) the kernel runs in shard_map: batch over
    fsdp=2, query and KV heads over tensor=2 (GQA groups stay whole on a device); logits and
    gradients equal the einsum path on the packed batch (4 CPU devices, interpret mode)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        import jax, jax.numpy as jnp, numpy as np
        from test_splash import TINY, packed_batch
        from regift_jax.core import sharding as shd
        from regift_jax.models.decoder import Decoder, init_params, param_shardings, trace_context
        from regift_jax.models.run_config import RunConfig
        assert jax.device_count() == 4
        mesh = shd.make_mesh({{"data": 1, "fsdp": 2, "tensor": 2}})
        cfg = TINY.replace(sliding_window=7)
        params = jax.device_put(init_params(cfg), param_shardings(cfg, mesh))
        ids, pos, seg = (jax.device_put(x, shd.batch_sharding(mesh)) for x in packed_batch())

        def loss(p, run):
            out = Decoder(cfg, run).apply({{"params": p}}, ids, positions=pos, segment_ids=seg)
            return jnp.sum(jnp.where(seg[..., None] > 0, out, 0.0) ** 2) * 1e-3, out
        grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (_, a), ga = grad(params, RunConfig())
        fast = RunConfig(attention_impl="splash")
        with trace_context(mesh, fast):
            lowered = grad.lower(params, fast)
            (_, b), gb = grad(params, fast)
        assert "manual_computation" in lowered.as_text()  # the shard_map
        # the einsum path with the activations pinned to the mesh: the same numbers
        pinned = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        with trace_context(mesh, RunConfig()):
            text = pinned.lower(params, RunConfig()).as_text()
            (_, c), gc = pinned(params, RunConfig())
        assert text.count("sharding_constraint") >= 10, text.count("sharding_constraint")
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-6, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gc)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-4)
        valid = np.asarray(seg) > 0
        d = float(np.abs(np.asarray(a) - np.asarray(b))[valid].max())
        assert d <= 1e-5, d
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-4)
        print("OK", d)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


# ------------------------------------------------------------------ compiled for a TPU topology
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


@needs_libtpu
def test_decoder_with_splash_compiles_for_v5e_2x2():
    """Forward + backward of a tiny bf16 decoder (GQA, remat, 200 tokens padded to 256) with the
    Mosaic splash kernel, sharded fsdp=2 x tensor=2 over a v5e:2x2 slice, compiles with libtpu's
    compiler on this CPU-only machine: the kernel is in the program as TPU custom calls (forward,
    recomputed forward, dq, dkv), not interpreted."""
    # libtpu locks a file against a second process; compiling for a topology drives no chip
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=devices)
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64)
    run = RunConfig(dtype="bfloat16", attention_impl="splash", remat_policy="full")
    shapes = jax.eval_shape(lambda: init_params(cfg, run=run))
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, param_shardings(cfg, mesh, run=run))
    batch = jax.ShapeDtypeStruct((4, 200), jnp.int32, sharding=shd.batch_sharding(mesh))

    def loss(p, ids, seg, pos):
        logits = Decoder(cfg, run).apply({"params": p}, ids, positions=pos, segment_ids=seg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch, batch, batch).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 3, "the splash kernel is not in the TPU program"
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 0
