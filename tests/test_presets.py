"""Tests for regift_jax.models.presets.

Independent references: the published parameter counts (model cards / safetensors totals, listed
here, not read from the presets), transformers' own model classes instantiated on torch's meta
device (exact parameter count, no memory), transformers' config parser, and the SmolLM2 GGUF's
metadata read with the gguf package.
"""

import json

import pytest

from regift_jax.models import presets as P
from regift_jax.models.config import ModelConfig

# Published sizes (Hugging Face safetensors totals / model cards).
PUBLISHED = {
    "smollm2-135m-instruct": 134_515_008,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b-v0.1": 7_241_732_096,
    "phi-4": 14_659_507_200,
    "deepseek-r1-distill-qwen-7b": 7_615_616_512,
    "deepseek-r1-distill-qwen-14b": 14_770_033_664,
    "deepseek-r1-distill-qwen-32b": 32_763_876_352,
}


def test_paper_presets_exist_with_published_sizes():
    for name, n in PUBLISHED.items():
        preset = P.get_preset(name)
        assert preset.model_config().num_params() == n, name
        assert preset.published_params == n, name
    for p in P.PRESETS.values():  # every stated size agrees with the architecture
        if p.published_params is not None:
            assert p.model_config().num_params() == p.published_params, p.name
    roles = {p.name: p.role for p in P.PRESETS.values()}
    students = {n for n, r in roles.items() if r == "student"}
    assert students >= {"llama-3.1-8b", "mistral-7b-v0.1", "phi-4"}
    assert {n for n, r in roles.items() if r == "teacher"} == {
        "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-qwen-14b",
        "deepseek-r1-distill-qwen-32b"}


@pytest.fixture(scope="module")
def transformers_meta():
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    def parse(hf: dict):
        hf = dict(hf)
        return AutoConfig.for_model(hf.pop("model_type"), **hf)

    def count(hf: dict) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(parse(hf))
        return sum(p.numel() for p in model.parameters())  # tied weights counted once

    return parse, count


def test_num_params_matches_transformers_models(transformers_meta):
    _, count = transformers_meta
    seen = {}
    for p in P.PRESETS.values():
        cfg = p.model_config()
        for hf in (p.hf_config_dict(), cfg.to_hf_config()):  # published, and our export
            key = json.dumps({k: v for k, v in hf.items() if "token_id" not in k}, sort_keys=True)
            if key not in seen:
                seen[key] = count(hf)
            assert seen[key] == cfg.num_params(), p.name


def test_export_parses_like_the_published_config(transformers_meta):
    parse, _ = transformers_meta
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id")
    for p in P.PRESETS.values():
        ours, published = parse(p.model_config().to_hf_config()), parse(p.hf_config_dict())
        for f in fields:
            assert getattr(ours, f) == getattr(published, f), (p.name, f)
        head_dim = getattr(published, "head_dim", None) or (
            published.hidden_size // published.num_attention_heads)
        assert getattr(ours, "head_dim", None) in (None, head_dim), p.name
        for f in ("rope_parameters", "rope_scaling", "rope_theta"):
            if hasattr(published, f):
                assert getattr(ours, f) == getattr(published, f), (p.name, f)
        if p.hf_config.get("model_type") == "mistral":
            assert ours.sliding_window == published.sliding_window == 4096
        if p.hf_config.get("model_type") == "qwen2":
            assert not ours.use_sliding_window and not published.use_sliding_window


def test_round_trip_through_hf_config():
    for p in P.PRESETS.values():
        cfg = p.model_config()
        assert ModelConfig.from_hf_config(cfg.to_hf_config(), name=cfg.name) == cfg, p.name
        assert cfg.name == p.name


def test_family_specific_fields():
    assert P.get_model_config("mistral-7b-v0.1").sliding_window == 4096
    qwen = P.get_model_config("deepseek-r1-distill-qwen-7b")
    assert qwen.family == "qwen2" and qwen.attention_bias and qwen.sliding_window is None
    phi = P.get_model_config("phi-4")
    assert phi.family == "phi3" and phi.fused_qkv and phi.head_dim == 128 and phi.num_kv_heads == 10
    llama = P.get_model_config("llama-3.1-8b")
    assert llama.rope_scaling == {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert P.get_model_config("llama-3.1-8b-instruct").eos_token_ids == (128001, 128008, 128009)
    assert P.get_model_config("llama-3.2-1b").tie_word_embeddings
    assert P.get_model_config("llama-3.2-1b").head_dim == 64


def test_smollm2_preset_matches_gguf_metadata():
    gguf = pytest.importorskip("gguf")
    from regift_jax.models.tokenizer import smollm2_gguf_path

    reader = gguf.GGUFReader(smollm2_gguf_path())

    def field(key):
        return reader.fields[key].contents()

    cfg = P.get_model_config("smollm2-135m-instruct")
    assert field("general.architecture") == "llama" and cfg.family == "llama"
    assert field("llama.block_count") == cfg.num_layers == 30
    assert field("llama.embedding_length") == cfg.hidden_size == 576
    assert field("llama.feed_forward_length") == cfg.intermediate_size == 1536
    assert field("llama.attention.head_count") == cfg.num_heads == 9
    assert field("llama.attention.head_count_kv") == cfg.num_kv_heads == 3
    assert field("llama.rope.dimension_count") == cfg.head_dim == 64
    assert field("llama.context_length") == cfg.max_position_embeddings == 8192
    assert field("llama.vocab_size") == cfg.vocab_size == len(field("tokenizer.ggml.tokens"))
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_theta) and cfg.rope_theta == 1e5
    eps = field("llama.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert field("tokenizer.ggml.bos_token_id") == cfg.bos_token_id == 1
    assert field("tokenizer.ggml.eos_token_id") == cfg.eos_token_id == 2
    assert field("tokenizer.ggml.padding_token_id") == cfg.pad_token_id == 2
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied embeddings
    assert cfg.tie_word_embeddings
    assert sum(int(t.n_elements) for t in reader.tensors) == cfg.num_params()


def test_lookup_is_forgiving_and_errors_are_clear():
    assert P.get_preset("SmolLM2").name == "smollm2-135m-instruct"
    assert P.get_preset("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m-instruct"
    assert P.get_preset("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert P.get_preset("  LLAMA_3.1_8B  ").name == "llama-3.1-8b"
    assert P.get_preset("Phi4").name == "phi-4"
    assert P.get_preset("DeepSeek-R1-Distill-Qwen-32B").name == "deepseek-r1-distill-qwen-32b"
    with pytest.raises(P.UnknownPresetError) as e:
        P.get_preset("gpt-5")
    for name in P.list_presets():
        assert name in str(e.value)
    assert len(P.list_presets()) == len(P.PRESETS) == len(set(P.list_presets()))
    cfg = P.get_model_config("phi-4", num_layers=2, max_position_embeddings=2048)
    assert cfg.num_layers == 2 and cfg.max_position_embeddings == 2048
    assert cfg.hidden_size == 5120
    with pytest.raises(TypeError, match="dtype"):  # run settings are a RunConfig's
        P.get_model_config("phi-4", dtype="bfloat16")


def test_presets_are_immutable_data():
    p = P.get_preset("llama-3.2-1b")
    with pytest.raises(TypeError):
        p.hf_config["hidden_size"] = 1
    d = p.hf_config_dict()
    d["rope_scaling"]["factor"] = 1.0
    assert p.hf_config["rope_scaling"]["factor"] == 32.0
    assert P.get_preset("llama-3.2-3b").hf_config["rope_scaling"]["factor"] == 32.0
    assert P.get_preset("llama-3.1-8b").hf_config["rope_scaling"]["factor"] == 8.0
