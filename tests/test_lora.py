"""LoRA adapters: PEFT's initialisation (kaiming-uniform A, zero B), deterministic in the key, and a
freshly adapted model computes exactly the base model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regift_jax.models import lora as lora_lib
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import PROJECTIONS, Decoder, init_params, proj_shapes
from regift_jax.models.run_config import RunConfig

TARGETS = tuple(PROJECTIONS)  # all seven, so multi-axis inputs (o_proj: heads x head_dim) count
CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32)
LORA = lora_lib.LoraConfig(rank=16, alpha=32.0, targets=TARGETS)


def _fan_in(name):
    return math.prod(proj_shapes(CFG, name)[0])


def _adapters(params):
    """name -> (A as [layers * fan_in, r], B) for every target."""
    out = {}
    for name in TARGETS:
        leaf = params["layers"][PROJECTIONS[name][0]][name]
        a = np.asarray(leaf["lora_a"], np.float64)
        out[name] = (a.reshape(-1, a.shape[-1]), np.asarray(leaf["lora_b"]))
    return out


def _assert_kaiming_uniform(a, fan_in, what):
    """``a`` looks like U(-1/sqrt(fan_in), 1/sqrt(fan_in)): inside the bound, reaching close to
    it, mean ~0 and std ~bound/sqrt(3)."""
    bound = 1.0 / math.sqrt(fan_in)
    n = a.size
    assert np.abs(a).max() <= bound * (1 + 1e-6), what
    assert np.abs(a).max() >= bound * (1 - 20.0 / n), what
    std = bound / math.sqrt(3)
    assert abs(a.mean()) < 5 * std / math.sqrt(n), what
    assert abs(a.std() / std - 1) < 5 / math.sqrt(n) * 1.2 + 0.01, (what, a.std(), std)


@pytest.fixture(scope="module")
def base_params():
    return init_params(CFG)


def test_add_lora_is_pefts_init(base_params):
    params = lora_lib.add_lora(CFG, LORA, base_params, seed=3)
    for name, (a, b) in _adapters(params).items():
        _assert_kaiming_uniform(a, _fan_in(name), name)
        assert not b.any(), name
    # the decoder's own parameter initialiser (init_params with LoRA on) draws the same law
    for name, (a, b) in _adapters(init_params(CFG, jax.random.PRNGKey(5), lora=LORA)).items():
        _assert_kaiming_uniform(a, _fan_in(name), f"init_params {name}")
        assert not b.any(), name


def test_matches_peft_adapters_on_the_same_shapes(base_params):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Block(torch.nn.Module):  # torch Linear layers with our projections' in/out sizes
        def __init__(self):
            super().__init__()
            for name in TARGETS:
                i, o = (math.prod(s) for s in proj_shapes(CFG, name))
                setattr(self, name, torch.nn.Linear(i, o, bias=False))

    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, target_modules=list(TARGETS),
                        init_lora_weights=True), Block())
    params = lora_lib.add_lora(CFG, LORA, base_params, seed=0)
    ours = _adapters(params)
    for name in TARGETS:
        layer = getattr(theirs, name)
        a_t = layer.lora_A["default"].weight.detach().double().numpy()  # [r, in]
        b_t = layer.lora_B["default"].weight.detach().numpy()
        assert a_t.shape == (LORA.rank, _fan_in(name))
        _assert_kaiming_uniform(a_t, _fan_in(name), f"peft {name}")  # the law, as PEFT draws it
        assert not b_t.any()
        a = ours[name][0]
        assert a.shape[1] == a_t.shape[0] and a.shape[0] == CFG.num_layers * a_t.shape[1]
        # same bound and spread as PEFT's own draw
        assert abs(np.abs(a).max() - np.abs(a_t).max()) < 0.02 / math.sqrt(_fan_in(name))
        assert abs(a.std() / a_t.std() - 1) < 0.1, name


def test_fresh_adapters_leave_the_logits_unchanged(base_params):
    params = lora_lib.add_lora(CFG, LORA, base_params, seed=1)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 9)))
    base = Decoder(CFG).apply({"params": base_params}, ids)
    adapted = Decoder(CFG, RunConfig(), LORA).apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    # ... and the adapters are live: a non-zero B changes them
    params["layers"]["self_attn"]["q_proj"]["lora_b"] += 0.1
    moved = Decoder(CFG, RunConfig(), LORA).apply({"params": params}, ids)
    assert float(jnp.abs(moved - base).max()) > 1e-3


def test_deterministic_in_the_key(base_params):
    a1 = _adapters(lora_lib.add_lora(CFG, LORA, base_params, seed=7))
    a2 = _adapters(lora_lib.add_lora(CFG, LORA, base_params, seed=7))
    a3 = _adapters(lora_lib.add_lora(CFG, LORA, base_params, seed=8))
    for name in TARGETS:
        np.testing.assert_array_equal(a1[name][0], a2[name][0])
        assert not np.array_equal(a1[name][0], a3[name][0])
    # targets draw independently of each other (one key per target name)
    assert not np.array_equal(a1["k_proj"][0], a1["v_proj"][0])
