"""The model's three configs: ModelConfig is the architecture only (a config.json round trip),
RunConfig (how it is computed) and LoraConfig (adapters) validate with clear messages, and the
training config's ``model`` / ``lora`` sections map onto them field for field."""

import dataclasses

import jax
import pytest

from regift_jax.core import configs_util
from regift_jax.models import presets
from regift_jax.models.config import ModelConfig
from regift_jax.models.run_config import (LORA_FIELDS, NO_LORA, RUN_FIELDS, LoraConfig, RunConfig,
                                          split_overrides)
from regift_jax.training import state as state_lib

RUN_AND_LORA = set(RUN_FIELDS) | set(LORA_FIELDS)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "llama-3.1-8b", "mistral-7b-v0.1",
                                  "deepseek-r1-distill-qwen-7b", "phi-4"])
def test_model_config_is_architecture_only(name):
    cfg = presets.get_model_config(name)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not fields & RUN_AND_LORA, fields & RUN_AND_LORA
    for attr in RUN_AND_LORA:
        assert not hasattr(cfg, attr), attr
    # every field follows from config.json: writing it out and reading it back is the identity
    assert ModelConfig.from_hf_config(cfg.to_hf_config(), name=cfg.name) == cfg
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf).to_hf_config() == hf


def test_run_config_validates_with_clear_messages():
    assert RunConfig() == RunConfig(param_dtype="float32", dtype="float32", remat_policy="none",
                                    attention_chunk=0, loss_chunk=0, attention_impl="einsum")
    with pytest.raises(ValueError, match=r"unknown attention_impl 'flash'; valid: einsum, xla, "
                                         r"cudnn, splash"):
        RunConfig(attention_impl="flash")
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs a bfloat16 or float16 "
                                         r"compute dtype .* got dtype='float32'"):
        RunConfig(attention_impl="cudnn")
    for dt in ("bfloat16", "bf16", "float16", "fp16"):
        assert RunConfig(dtype=dt, attention_impl="cudnn").attention_impl == "cudnn"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        RunConfig(dtype="bfloat16", attention_impl="cudnn").replace(dtype="float32")


def test_lora_config_validates_and_is_off_at_rank_0():
    assert not NO_LORA.enabled and NO_LORA == LoraConfig()
    lora = LoraConfig(rank=8, targets=["q_proj", "o_proj"])
    assert lora.enabled and lora.targets == ("q_proj", "o_proj")  # a list becomes a tuple
    assert lora.applies_to("o_proj") and not lora.applies_to("k_proj")
    assert not LoraConfig(targets=("q_proj",)).applies_to("q_proj")  # rank 0: no adapters
    with pytest.raises(ValueError, match="LoRA rank must be >= 0"):
        LoraConfig(rank=-1)
    from regift_jax.models import lora as lora_lib  # the targets are checked against the layers
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]"):
        lora_lib.add_lora(cfg, LoraConfig(rank=4, targets=("qkv",)), {})
    with pytest.raises(ValueError, match="lora_rank must be > 0"):
        lora_lib.add_lora(cfg, NO_LORA, {})


def test_configs_are_jit_static_arguments():
    f = jax.jit(lambda x, run, lora: x + run.attention_chunk + lora.rank, static_argnums=(1, 2))
    assert int(f(1, RunConfig(attention_chunk=2), LoraConfig(rank=3))) == 6
    assert hash(RunConfig()) == hash(RunConfig()) and hash(NO_LORA) == hash(LoraConfig())


def test_split_overrides_routes_flat_names():
    arch, run, lora = split_overrides({"num_layers": 2, "dtype": "bfloat16", "remat_policy": "full",
                                       "lora_rank": 4, "lora_targets": ["q_proj"]})
    assert arch == {"num_layers": 2}
    assert run == {"dtype": "bfloat16", "remat_policy": "full"}
    assert lora == {"rank": 4, "targets": ["q_proj"]}


def test_training_config_sections_map_onto_run_and_lora():
    c = configs_util.base_config()
    c.model.dtype, c.model.remat_policy, c.model.attention_impl = "bfloat16", "full", "xla"
    run = state_lib.run_config(c.model)
    assert dataclasses.asdict(run) == {k: c.model[k] for k in RUN_FIELDS}
    c.lora.enabled, c.lora.rank, c.lora.targets = True, 8, ("q_proj", "k_proj")
    lora = state_lib.lora_config(c.lora)
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (
        8, c.lora.alpha, c.lora.dropout, ("q_proj", "k_proj"))
    c.lora.enabled = False
    assert state_lib.lora_config(c.lora) == NO_LORA


def test_auto_attention_is_splash_on_tpu_and_einsum_elsewhere():
    """``model.attention_impl="auto"`` (the 8B presets): the Pallas kernel where it compiles
    (TPU, and the TPU preflight), the decoder's einsum on CPU/GPU, where splash would run
    interpreted."""
    import ml_collections
    from regift_jax.models.run_config import resolve_attention_impl
    from regift_jax.training.state import run_config
    assert [resolve_attention_impl("auto", p) for p in ("tpu", "cpu", "gpu")] == [
        "splash", "einsum", "einsum"]
    assert resolve_attention_impl("xla", "tpu") == "xla"
    m = ml_collections.ConfigDict(dict(param_dtype="float32", dtype="bfloat16",
                                       remat_policy="full", attention_chunk=128, loss_chunk=512,
                                       attention_impl="auto"))
    assert run_config(m).attention_impl == "einsum"  # this CPU
    assert run_config(m, "tpu").attention_impl == "splash"
