"""Decoder parity with transformers for all four families, cache == full forward, masks."""

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from regift_jax.models import checkpoints as ck  # noqa: E402
from regift_jax.models.decoder import Decoder, init_cache, positions_from_mask  # noqa: E402
from regift_jax.models.run_config import RunConfig  # noqa: E402
from _hf_tiny import FAMILIES, batch, hf_logits, make_hf_model  # noqa: E402


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    m = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(str(d))
    cfg, params = ck.load_hf(str(d))
    return request.param, m, cfg, params


def test_config_flags(family_model):
    fam, _, cfg, params = family_model
    assert cfg.family == fam
    assert (cfg.sliding_window == 7) == (fam == "mistral")
    assert cfg.attention_bias == (fam == "qwen2")
    assert cfg.fused_qkv == (fam == "phi3")
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    if fam == "llama":
        assert cfg.rope_scaling["rope_type"] == "llama3"


def test_logits_match_transformers(family_model):
    fam, m, cfg, params = family_model
    ids, mask = batch()
    ref = hf_logits(m, ids, mask)
    out = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(ids),
                                        positions=positions_from_mask(jnp.asarray(mask)),
                                        segment_ids=jnp.asarray(mask)))
    valid = mask.astype(bool)
    diff = np.abs(out - ref)[valid].max()
    assert diff <= 1e-4, (fam, diff)
    # the test is sensitive: a perturbed weight breaks it
    bad = jax.tree.map(lambda x: x, params)
    bad["norm"]["scale"] = bad["norm"]["scale"] * 1.01
    out2 = np.asarray(Decoder(cfg).apply({"params": bad}, jnp.asarray(ids),
                                         positions=positions_from_mask(jnp.asarray(mask)),
                                         segment_ids=jnp.asarray(mask)))
    assert np.abs(out2 - ref)[valid].max() > 1e-3


def test_cached_decoding_equals_full_forward(family_model):
    fam, _, cfg, params = family_model
    ids, mask = batch()
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    model = Decoder(cfg)
    pos = positions_from_mask(mask)
    full = model.apply({"params": params}, ids, positions=pos, segment_ids=mask)
    P = 20  # prefill 20 tokens, then decode the remaining 13 one at a time
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 3)
    lg, cache = model.apply({"params": params}, ids[:, :P], positions=pos[:, :P],
                            segment_ids=mask[:, :P], cache=cache)
    outs = [lg]
    for t in range(P, ids.shape[1]):
        lg, cache = model.apply({"params": params}, ids[:, t:t + 1], positions=pos[:, t:t + 1],
                                segment_ids=mask[:, t:t + 1], cache=cache)
        outs.append(lg)
    inc = jnp.concatenate(outs, axis=1)
    valid = np.asarray(mask).astype(bool)
    diff = float(np.abs(np.asarray(inc) - np.asarray(full))[valid].max())
    assert diff <= 1e-5, (fam, diff)
    assert int(cache["index"]) == ids.shape[1]


def test_sliding_window_is_applied():
    m = make_hf_model("mistral")
    import tempfile
    d = tempfile.mkdtemp()
    m.save_pretrained(d)
    cfg, params = ck.load_hf(d)
    ids, mask = batch(pad_row=1, n_pad=0)
    a = Decoder(cfg).apply({"params": params}, jnp.asarray(ids))
    b = Decoder(cfg.replace(sliding_window=None)).apply({"params": params}, jnp.asarray(ids))
    # identical inside the window, different beyond it
    np.testing.assert_allclose(np.asarray(a)[:, :7], np.asarray(b)[:, :7], atol=1e-6)
    assert np.abs(np.asarray(a)[:, 10:] - np.asarray(b)[:, 10:]).max() > 1e-3


def test_bf16_compute_close_to_fp32(family_model):
    fam, _, cfg, params = family_model
    ids, mask = batch()
    f32 = Decoder(cfg).apply({"params": params}, jnp.asarray(ids))
    b16 = Decoder(cfg, RunConfig(dtype="bfloat16")).apply({"params": params}, jnp.asarray(ids))
    assert b16.dtype == jnp.float32  # logits always come back in float32
    assert float(jnp.abs(b16 - f32).max()) < 0.5


def test_remat_policy_same_values(family_model):
    fam, _, cfg, params = family_model
    ids, _ = batch()
    a = Decoder(cfg).apply({"params": params}, jnp.asarray(ids))
    b = Decoder(cfg, RunConfig(remat_policy="full")).apply({"params": params},
                                                          jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_llama3_config_is_a_valid_static_argument():
    # rope_scaling is a dict in HF configs; the config must still hash for jax.jit static args
    from regift_jax.models.presets import get_model_config
    cfg = get_model_config("llama-3.1-8b")
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert hash(cfg) == hash(get_model_config("llama-3.1-8b"))
    tiny = cfg.replace(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8)
    f = jax.jit(lambda ids, c: ids * 2, static_argnums=1)
    assert int(f(jnp.ones((1,), jnp.int32), tiny)[0]) == 2
    with pytest.raises(TypeError, match="read-only"):
        cfg.rope_scaling["factor"] = 2.0


def padded_and_packed_batch():
    """The left-padded test batch with row 0 packing two sequences (segments 1 and 2)."""
    ids, mask = batch()
    pos = np.array(positions_from_mask(jnp.asarray(mask)))
    seg = np.asarray(mask).copy()
    seg[0, 20:] = 2  # row 0 packs two sequences
    pos[0, 20:] = np.arange(ids.shape[1] - 20)
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)


def assert_same_values_and_gradients(params, cfg, other: RunConfig):
    """Logits (on real tokens) and every parameter gradient of :func:`padded_and_packed_batch`
    agree when ``cfg`` runs with the default :class:`RunConfig` and with ``other``; returns
    ``other``'s logits."""
    ids, pos, seg = padded_and_packed_batch()

    def loss(p, run):
        out = Decoder(cfg, run).apply({"params": p}, ids, positions=pos, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, out, 0.0) ** 2) * 1e-3, out
    (_, a), ga = jax.value_and_grad(loss, has_aux=True)(params, RunConfig())
    (_, b), gb = jax.value_and_grad(loss, has_aux=True)(params, other)
    valid = np.asarray(seg) > 0
    assert float(np.abs(np.asarray(a) - np.asarray(b))[valid].max()) <= 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)
    return np.asarray(b)


def test_attention_chunk_same_values_and_gradients(family_model):
    """Causal query chunks (model.attention_chunk) skip only masked scores: logits and gradients
    equal the one-matrix path on a left-padded batch and on a packed row (two segments), for every
    family (Mistral's sliding window included)."""
    fam, _, cfg, params = family_model
    # 33 tokens: chunks of 8, 8, 8, 8, 1
    assert_same_values_and_gradients(params, cfg, RunConfig(attention_chunk=8))


def test_attention_impl_xla_same_values_and_gradients(family_model):
    """attention_impl="xla" (jax.nn.dot_product_attention, the path "cudnn" takes on a GPU)
    equals the decoder's einsum attention: logits and all parameter gradients on a left-padded
    batch with a packed row (the boolean dpa_mask), and logits on plain causal rows (no
    positions/segments given: mask None, is_causal only), for every family (Mistral's window
    included)."""
    fam, m, cfg, params = family_model
    dpa = RunConfig(attention_impl="xla")
    b = assert_same_values_and_gradients(params, cfg, dpa)
    assert np.isfinite(b).all()  # padding rows too (they attend to themselves)
    # plain causal rows, and the independent reference: transformers on unpadded rows
    full = jnp.asarray(batch()[0])
    c = Decoder(cfg).apply({"params": params}, full)
    d = Decoder(cfg, dpa).apply({"params": params}, full)
    np.testing.assert_allclose(np.asarray(c), np.asarray(d), atol=1e-5)
    ref = hf_logits(m, np.asarray(full), np.ones(full.shape, np.int64))
    assert float(np.abs(np.asarray(d) - ref).max()) <= 1e-4


def test_attention_impl_is_validated():
    run = RunConfig()
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        run.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        run.replace(dtype="float32", attention_impl="cudnn")
    assert run.replace(dtype="bfloat16", attention_impl="cudnn").attention_impl == "cudnn"
