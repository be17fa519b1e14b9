"""Trainer: configs, loss/accumulation numerics, LoRA, non-finite steps, checkpoints and resume,
sharding invariance, export.

Everything runs on a tiny random Llama (2 layers, width 64, vocab 512) written to an HF directory
with ``export_hf`` and the byte-level BPE fixture tokenizer, trained on the synthetic trace
fixture (``tests/fixtures/train``).  One 6-step LoRA run (``ref``) is the reference the resume,
preemption, fallback and 8-device runs must reproduce.  A persistent XLA compilation cache in a
per-session temporary directory (``train.compilation_cache_dir``) lets the runs that compile the
same program (in this process and in the sub-processes) compile it once.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "train")
TRACES = os.path.join(FIXTURES, "traces")

from regift_jax.core import configs_util
from regift_jax import train
from regift_jax.training import checkpointing, examples, inputs, optim  # noqa: E402
from regift_jax.training import state as state_lib, step as step_lib  # noqa: E402
from regift_jax.models import lora as lora_lib  # noqa: E402
from regift_jax.models.checkpoints import export_hf, load_hf  # noqa: E402
from regift_jax.models.config import ModelConfig  # noqa: E402
from regift_jax.models.run_config import RunConfig  # noqa: E402
from regift_jax.models.decoder import Decoder, init_params  # noqa: E402

TINY = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=512, bos_token_id=None, eos_token_id=0,
                   pad_token_id=0, rope_theta=10000.0)
STEPS = 6
# Cheaper XLA CPU compilation for sub-processes whose results are compared with tolerances.
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


def _tokenizer():
    from regift_jax.models.tokenizer import load_tokenizer
    return load_tokenizer(os.path.join(FIXTURES, "tokenizer"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The runs switch JAX's persistent compilation cache on; switch it off again afterwards so
    other test modules in this process are unaffected."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    yield str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def random_params(cfg, seed=0):
    """Deterministic random weights (numpy; no XLA compile): N(0, 0.05^2), norm scales ~1."""
    abstract = jax.eval_shape(lambda: init_params(cfg))
    rng = np.random.RandomState(seed)

    def one(path, x):
        if optim.path_str(path).endswith("scale"):
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, abstract)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_hf"))
    export_hf(d, TINY, random_params(TINY), tokenizer=_tokenizer())
    return d


def make_config(model_dir, cache, **over):
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "llama.py"))
    c.model.name = model_dir
    c.data.source = TRACES
    c.data.seq_len = 256
    c.train.global_batch = 8
    c.train.num_steps = STEPS
    c.train.compilation_cache_dir = cache
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 3
    c.eval.every_steps = 3
    c.eval.max_batches = 2
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.export.enabled = False
    for k, v in over.items():
        node = c
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def losses(history, prefix="train"):
    return [r[f"{prefix}/loss"] for r in history if f"{prefix}/loss" in r]


@pytest.fixture(scope="module")
def ref(tiny_dir, cache_dir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref"))
    cfg = make_config(tiny_dir, cache_dir, export__enabled=True)
    res = train.run_training(cfg, wd)
    res["params_host"] = host(res["state"].params)
    res["frozen_host"] = host(res["frozen"])
    res["opt_host"] = host(res["state"].opt_state)
    return res


# ============================================================================ configs
def test_presets_hold_the_paper_recipe():
    ld = configs_util.load_config_file
    base_keys = configs_util.flat_keys(configs_util.base_config())
    specs = ["configs/llama.py", "configs/llama.py:llama3_1_8b",
             "configs/llama.py:llama3_1_8b_full",
             "configs/mistral.py", "configs/mistral.py:mistral_7b_full", "configs/phi4.py",
             "configs/phi4.py:phi4_full", "configs/instruction.py",
             "configs/instruction.py:student=llama3_1_8b"]
    cfgs = {s: ld(os.path.join(REPO, s)) for s in specs}
    for s, c in cfgs.items():  # presets change values, never the set of keys
        assert configs_util.flat_keys(c) == base_keys, s
    d = cfgs["configs/llama.py"]
    assert (d.model.name, d.lora.enabled, d.lora.rank, d.lora.alpha, d.lora.dropout,
            tuple(d.lora.targets), d.data.source) == ("smollm2-135m-instruct", True, 16, 32.0,
                                                      0.05, ("q_proj", "v_proj"),
                                                      "tfds:regift_traces/correct")
    p = cfgs["configs/llama.py:llama3_1_8b"]
    assert (p.train.global_batch, p.optim.learning_rate, p.optim.warmup_fraction,
            p.optim.weight_decay, p.train.num_epochs, p.data.seq_len, p.lora.rank, p.lora.alpha,
            p.lora.dropout, tuple(p.lora.targets)) == (32, 2e-4, 0.05, 0.01, 10.0, 1024, 16, 32.0,
                                                       0.05, ("q_proj", "v_proj"))
    assert p.model.remat_policy == "full"  # what fits a v5e-8 (tests/test_preflight.py)
    f = cfgs["configs/llama.py:llama3_1_8b_full"]
    assert not f.lora.enabled and f.optim.learning_rate == 2e-5
    assert cfgs["configs/mistral.py"].model.name == "mistral-7b-v0.1"
    assert cfgs["configs/phi4.py"].model.name == "phi-4"
    i = cfgs["configs/instruction.py:student=llama3_1_8b"]
    assert (i.data.kind, i.data.template, i.data.squad_split, i.model.name,
            i.optim.learning_rate) == ("squad_gold", "instruction_baseline", "pool",
                                       "llama-3.1-8b", 2e-4)
    with pytest.raises(ValueError, match="valid: smollm2_135m, llama3_1_8b"):
        ld(os.path.join(REPO, "configs/llama.py:llama9"))
    with pytest.raises(ValueError, match="unknown key 'lr'; valid: preset"):
        configs_util.parse_arg("lr=3", preset="x")


def test_unknown_override_lists_valid_keys(capsys):
    cfg = os.path.join(REPO, "configs", "llama.py")
    rc = train.main(["train", f"--config={cfg}", "--config.optim.lr=2e-5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown config key 'optim.lr'" in err
    assert "learning_rate" in err and "warmup_steps" in err
    rc = train.main(["train", f"--config={cfg}", "--config.optm.learning_rate=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "did you mean 'optim'" in err and "checkpoint, data" in err
    configs_util.check_overrides(["x", f"--config={cfg}", "--config.optim.learning_rate=2e-5",
                                  "--noconfig.lora.enabled"])  # valid keys pass


# ============================================================================ numerics
def test_schedule_and_weight_decay_mask():
    c = configs_util.base_config().optim
    c.learning_rate, c.warmup_steps, c.schedule, c.end_lr_fraction = 1.0, 4, "linear", 0.0
    s = optim.make_schedule(c, 14)
    np.testing.assert_allclose(np.asarray(jax.vmap(s)(jnp.array([0, 2, 4, 9, 14]))),
                               [0, .5, 1, .5, 0], atol=1e-6)
    c.schedule, c.warmup_steps, c.warmup_fraction = "cosine", -1, 0.25
    s = optim.make_schedule(c, 8)  # 2 warmup steps, 6 cosine steps
    np.testing.assert_allclose(np.asarray(jax.vmap(s)(jnp.array([1, 2, 5, 8]))),
                               [0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 3 / 6)), 0.0], atol=1e-6)
    params = random_params(TINY.replace(attention_bias=True))
    m = optim.decay_mask(params, configs_util.base_config().optim.no_decay)
    flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(m)[0]}
    assert flat["embed_tokens"] is False and flat["norm/scale"] is False
    assert flat["layers/input_layernorm/scale"] is False
    assert flat["layers/self_attn/q_proj/bias"] is False
    assert flat["layers/self_attn/q_proj/kernel"] is True and flat["lm_head"] is True
    # One AdamW step with zero gradients: decayed leaves shrink by lr * wd, the others stay.
    c = configs_util.base_config().optim
    c.learning_rate, c.warmup_steps, c.schedule, c.weight_decay = 0.1, 0, "constant", 0.5
    tx, _ = optim.make_optimizer(c, 10, params)
    zeros = jax.tree.map(np.zeros_like, params)
    upd = host(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(zeros, params))
    for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]:
        x = params
        for k in p:
            x = x[k.key]
        want = -0.05 * x if flat[optim.path_str(p)] else np.zeros_like(x)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def batch():
    """A real pipeline batch: 8 packed rows of 256 tokens with prompt/padding masked."""
    from regift_jax.data.pipeline import SFTPipeline
    c = configs_util.base_config()
    c.data.source, c.data.seq_len = TRACES, 256
    tok = _tokenizer()
    ex, _ = examples.load_examples(c.data)
    render, _ = inputs.make_render(c.data, tok)
    pipe = inputs.make_pipeline(ex, tok, render, c.data, global_batch=8, seed=0, num_epochs=1,
                                shuffle=False, prefetch=0)
    assert isinstance(pipe, SFTPipeline)
    b = next(pipe)
    assert 0 < b["loss_mask"].sum() < (b["segment_ids"] != 0).sum()  # prompts are masked
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_loss_is_masked_token_mean(batch):
    params = random_params(TINY, seed=2)
    logits_fn = jax.jit(lambda p, b: Decoder(TINY).apply(
        {"params": p}, b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"]))
    logits = np.asarray(logits_fn(params, batch), np.float64)
    t, m = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"]).astype(bool)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, t[..., None], -1)[..., 0]
    eval_fn = jax.jit(lambda p, b: step_lib.eval_step(p, {}, b, model_cfg=TINY))
    out = host(eval_fn(params, batch))
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], nll[m].mean(), rtol=1e-5)
    assert out["tokens"] == m.sum()
    np.testing.assert_allclose(out["correct"] / out["tokens"], (logits.argmax(-1) == t)[m].mean())
    # Changing the target of a prompt or padding position cannot change the loss.
    tgt = t.copy()
    for pos in np.argwhere(~m)[::97]:
        tgt[tuple(pos)] = (tgt[tuple(pos)] + 7) % 512
    out2 = host(eval_fn(params, {**batch, "targets": jnp.asarray(tgt)}))
    assert out2["loss_sum"] == out["loss_sum"]


def test_grad_accumulation_equals_one_big_batch(batch):
    """4 micro-batches of 2 rows == 1 batch of 8 rows: loss, gradient and AdamW update."""
    cfg = TINY  # full fine-tuning, no dropout
    params = random_params(cfg, seed=3)
    c = configs_util.base_config().optim
    c.warmup_steps = 0
    tx, _ = optim.make_optimizer(c, 10, params)
    update = jax.jit(lambda g, p: optax_apply(tx, g, p))
    out = {}
    for k in (1, 4):
        fn = jax.jit(lambda p, b, k=k: step_lib.loss_and_grads(p, {}, b, jax.random.PRNGKey(0),
                                                               model_cfg=cfg, accum=k))
        grads, aux = fn(params, batch)
        out[k] = host((grads, aux, update(grads, params)))
    (g1, a1, p1), (g4, a4, p4) = out[1], out[4]
    np.testing.assert_allclose(a4["loss"], a1["loss"], rtol=1e-6)
    assert a4["tokens"] == a1["tokens"] and a4["correct"] == a1["correct"]

    def flat(t):
        return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(t)])
    v1, v4 = flat(g1), flat(g4)
    assert np.linalg.norm(v4 - v1) <= 1e-5 * np.linalg.norm(v1)
    w1, w4, w0 = flat(p1), flat(p4), flat(params)
    assert np.linalg.norm(w4 - w1) <= 1e-5 * np.linalg.norm(w1 - w0)  # the update itself


def test_fast_paths_equal_the_plain_step(batch):
    """model.loss_chunk (LM head on the loss positions only) and model.attention_chunk (causal
    query chunks) change no value: loss, token counts and gradients equal the plain path, for full
    fine-tuning (tied head trained) and LoRA (frozen head); so does model.attention_impl="xla"."""
    from regift_jax.models import lora as lora_lib
    plain = RunConfig()
    fast = RunConfig(loss_chunk=64, attention_chunk=32)
    full = random_params(TINY, seed=4)
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    lparams = lora_lib.add_lora(TINY, lora, random_params(TINY, seed=4), seed=1)
    trainable, frozen = lora_lib.split(lparams)
    no_lora = lora_lib.LoraConfig()
    cases = [(no_lora, fast, full, {}),
             (lora, fast, trainable, frozen),
             # jax.nn.dot_product_attention (the GPU cuDNN path's call) with the chunked loss
             (no_lora, RunConfig(loss_chunk=64, attention_impl="xla"), full, {})]
    plain_runs = {}  # the plain full-FT step serves two cases: compiled once

    def run(r, lo, p, fr):
        fn = jax.jit(lambda p, b: step_lib.loss_and_grads(p, fr, b, jax.random.PRNGKey(0),
                                                          model_cfg=TINY, run=r, lora=lo))
        return host(fn(p, batch))
    for lo, fast_run, p, fr in cases:
        if lo not in plain_runs:
            plain_runs[lo] = run(plain, lo, p, fr)
        (g0, a0), (g1, a1) = plain_runs[lo], run(fast_run, lo, p, fr)
        np.testing.assert_allclose(a1["loss"], a0["loss"], rtol=1e-5)
        assert a1["tokens"] == a0["tokens"] and a1["correct"] == a0["correct"]
        v0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g0)])
        v1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g1)])
        assert np.linalg.norm(v1 - v0) <= 1e-4 * np.linalg.norm(v0)


def optax_apply(tx, grads, params):
    import optax
    upd, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, upd)


# ============================================================================ the reference run
def test_reference_run_outputs(ref):
    tr = losses(ref["history"])
    assert len(tr) == STEPS and all(np.isfinite(tr))
    assert np.mean(tr[-2:]) < np.mean(tr[:2])  # it learns
    ev = losses(ref["history"], "eval")
    assert len(ev) == 2  # eval.every_steps=3, and at the end
    assert ref["step"] == STEPS and ref["skipped_steps"] == 0 and not ref["preempted"]
    wd = ref["workdir"]
    assert glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs if "train/loss" in r] == list(range(1, STEPS + 1))
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/step_time_s", "train/accuracy"):
        assert all(np.isfinite(r[key]) for r in recs if "train/loss" in r), key
    assert sorted(int(s) for s in os.listdir(ref["checkpoint_dir"]) if s.isdigit()) == [2, 4, 6]
    assert ref["checkpoint_steps"] == [2, 4, 6]
    for s in (2, 4, 6):
        with open(os.path.join(wd, "data_state", str(s), "process_0.json")) as f:
            assert json.load(f)["data"]["stats"]["batches"] == s
    assert os.path.exists(os.path.join(ref["export_dir"], "model.safetensors"))
    with open(os.path.join(wd, "result.json")) as f:
        assert json.load(f)["total_steps"] == STEPS


def test_lora_trains_only_adapters(ref, tiny_dir):
    trainable, frozen, opt = ref["params_host"], ref["frozen_host"], ref["opt_host"]
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert {p.split("/")[2] for p in paths} == {"q_proj", "v_proj"}
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(np.asarray(x).size for x in jax.tree.leaves(opt))
    assert n_opt < 2 * n_lora + 16  # mu and nu of the adapters + counters; no base weights
    _, base = load_hf(tiny_dir)
    assert_trees_equal(frozen, host(base))  # base weights untouched
    for name in ("q_proj", "v_proj"):  # lora_b starts at 0 and has been trained
        assert np.abs(trainable["layers"]["self_attn"][name]["lora_b"]).max() > 0


def test_export_loads_in_transformers(ref, batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(ref["export_dir"], dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    ids = np.asarray(batch["inputs"][:2, :120])
    with torch.no_grad():
        want = m(input_ids=torch.tensor(ids)).logits.numpy()
    params = lora_lib.combine(ref["params_host"], ref["frozen_host"])
    got = np.asarray(Decoder(ref["model_cfg"], ref["run"], ref["lora"]).apply(
        {"params": params}, jnp.asarray(ids)))
    assert ref["lora"].rank == 16
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ============================================================================ resume paths
KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    import ml_collections
    from regift_jax.training import loop
    cfg = ml_collections.ConfigDict(json.load(open(sys.argv[1])))

    def cb(step, info):
        if step == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup; an async save may be in flight

    loop.run(cfg, sys.argv[2], callbacks=[cb])
""")


def test_sigkill_then_resume_is_bitwise_identical(ref, tiny_dir, cache_dir, tmp_path):
    cfg = make_config(tiny_dir, cache_dir, log__tensorboard=False)
    wd = str(tmp_path / "killed")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=REPO))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(script), str(cfg_file), wd, "4"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    done = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert done and done[-1] in (2, 4)  # step 4's async save may or may not have committed
    res = train.run_training(cfg, wd)
    assert res["step"] == STEPS
    assert_trees_equal(host(res["state"].params), ref["params_host"])
    assert_trees_equal(host(res["state"].opt_state), ref["opt_host"])
    assert losses(res["history"]) == losses(ref["history"])[done[-1]:]


def test_sigterm_saves_returns_and_resumes(ref, tiny_dir, cache_dir, tmp_path):
    cfg = make_config(tiny_dir, cache_dir)
    wd = str(tmp_path / "preempted")

    def cb(step, info):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    res = train.run_training(cfg, wd, callbacks=[cb])
    assert res["preempted"] and res["step"] == 3 and res["checkpoint_steps"] == [2, 3]
    assert res["export_dir"] == ""
    assert signal.getsignal(signal.SIGTERM) is before  # our handler is removed again
    res2 = train.run_training(cfg, wd)
    assert not res2["preempted"] and res2["step"] == STEPS
    assert_trees_equal(host(res2["state"].params), ref["params_host"])


def test_corrupt_latest_checkpoint_falls_back(ref, tiny_dir, cache_dir, tmp_path, caplog):
    wd = str(tmp_path / "corrupt")
    shutil.copytree(ref["workdir"], wd)
    # Truncate every array file of the latest step (6): a torn write on a dying disk.
    files = [f for f in glob.glob(os.path.join(wd, "checkpoints", "6", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    # ... and make step 4 unusable too, in another way: its data-iterator state is missing.
    os.remove(os.path.join(wd, "data_state", "4", "process_0.json"))
    cfg = make_config(tiny_dir, cache_dir)
    with caplog.at_level(logging.WARNING, logger="regift_jax.training.checkpointing"):
        res = train.run_training(cfg, wd)
    msgs = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(msgs) == 2 and "step 6" in msgs[0] and "step 4" in msgs[1], msgs
    assert "falling back to the previous one" in msgs[0]
    assert sorted(os.listdir(os.path.join(wd, checkpointing.UNREADABLE_DIR)))[0].startswith("4.")
    assert res["step"] == STEPS
    assert losses(res["history"]) == losses(ref["history"])[2:]  # resumed from step 2
    assert_trees_equal(host(res["state"].params), ref["params_host"])


def test_nonfinite_steps_are_skipped_then_halt(tiny_dir, cache_dir, tmp_path):
    """A NaN in a frozen base weight makes every loss NaN: each step leaves the state unchanged,
    the skips are counted, and the run halts with a clear error after max_nonfinite_in_a_row."""
    params = host(load_hf(tiny_dir)[1])
    params["layers"]["mlp"]["down_proj"]["kernel"][1, 3, 5] = np.nan
    bad = str(tmp_path / "nan_model")
    export_hf(bad, TINY, params, tokenizer=_tokenizer())
    cfg = make_config(bad, cache_dir, train__max_nonfinite_in_a_row=3)
    seen = []

    def cb(step, info):
        s = info["state"]
        seen.append((step, host(s.params), int(s.skipped), int(s.applied), int(s.bad_streak)))

    with pytest.raises(step_lib.NonFiniteError, match="at step 3: 3 consecutive steps with a "
                       "non-finite loss"):
        train.run_training(cfg, str(tmp_path / "wd"), callbacks=[cb])
    assert [x[0] for x in seen] == [1, 2, 3]  # noticed while step 4 runs
    for step, p, skipped, applied, streak in seen:
        assert (skipped, applied, streak) == (step, 0, step)
        assert_trees_equal(p, seen[0][1])
    # The step-2 checkpoint holds the unchanged (finite) adapters.
    assert os.listdir(os.path.join(tmp_path, "wd", "checkpoints")) == ["2"]
    # A non-finite state is never written.
    ck = checkpointing.Checkpointer(str(tmp_path / "wd2"), configs_util.base_config().checkpoint)
    state = state_lib.TrainState(step=jnp.int32(1), params={"w": jnp.array([1.0, jnp.inf])},
                                 opt_state=(), rng=jax.random.PRNGKey(0), applied=jnp.int32(0),
                                 skipped=jnp.int32(0), bad_streak=jnp.int32(0))
    assert ck.save(1, state, {}, {}) is False
    ck.close()
    assert ck.steps() == []


# ============================================================================ sharding
SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import jax, ml_collections
    from regift_jax.training import loop
    assert jax.device_count() == 8, jax.devices()
    cfg = ml_collections.ConfigDict(json.load(open(sys.argv[1])))
    res = loop.run(cfg, sys.argv[2])
    shardings = {{str(p): str(x.sharding.spec) for p, x in
                 jax.tree_util.tree_flatten_with_path(res["state"].params)[0]}}
    json.dump({{"history": res["history"], "shardings": shardings}}, open(sys.argv[3], "w"))
""")


def test_eight_devices_give_the_same_loss_curve(ref, tiny_dir, cache_dir, tmp_path):
    """Mesh data=2 x fsdp=2 x tensor=2 on 8 simulated CPU devices vs 1 device."""
    cfg = make_config(tiny_dir, cache_dir, mesh__data=2, mesh__fsdp=2, mesh__tensor=2,
                      checkpoint__every_steps=-1, log__tensorboard=False)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format(repo=REPO))
    out = tmp_path / "out.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE)
    p = subprocess.run([sys.executable, str(script), str(cfg_file), str(tmp_path / "wd"),
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    a, b = np.array(losses(got["history"])), np.array(losses(ref["history"]))
    assert len(a) == STEPS
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(losses(got["history"], "eval"), losses(ref["history"], "eval"),
                               rtol=1e-5)
    # The adapters really are sharded: lora_a of q_proj is (layers, embed->fsdp, lora).
    spec = [v for k, v in got["shardings"].items() if "q_proj" in k and "lora_a" in k][0]
    assert "fsdp" in spec, got["shardings"]


def test_instruction_baseline_data():
    """configs/instruction.py: SQuAD-v2 pool questions with gold answers, rendered with the
    instruction_baseline template (no reasoning)."""
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "instruction.py"))
    ex, summary = examples.load_examples(c.data)
    assert len(ex) == 10152 and summary["split"] == "pool"  # see data/builders/squad_v2.py
    unanswerable = [e for e in ex if e["answer"] == "Not in background."]
    assert 0.3 * len(ex) < len(unanswerable) < 0.7 * len(ex)
    train_ex, held = examples.split_heldout(ex, c.data.eval_fraction)
    assert abs(len(held) / len(ex) - c.data.eval_fraction) < 0.01
    assert not {e["id"] for e in held} & {e["id"] for e in train_ex}
    assert examples.split_heldout(ex[::-1], c.data.eval_fraction)[1] == held[::-1]  # by id only
    render, tid = inputs.make_render(c.data, None)
    prompt, pieces = render(ex[0])
    assert tid == "instruction_baseline@v1" and prompt.endswith("### Response:\n")
    assert "".join(p.text for p in pieces) == f"<answer> {ex[0]['answer'].strip()} </answer>"


def test_no_resume_refuses_a_used_workdir(ref, tiny_dir, cache_dir, tmp_path):
    wd = str(tmp_path / "used")
    shutil.copytree(ref["workdir"], wd)
    cfg = make_config(tiny_dir, cache_dir, checkpoint__resume=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train.run_training(cfg, wd)


# ============================================================================ memory check
def test_memory_check_refuses_a_step_that_does_not_fit(ref, tiny_dir, cache_dir, tmp_path,
                                                        monkeypatch):
    """On a device that reports its memory the step is compiled ahead of time and checked
    (regift_jax.training.memory); the CPU reports none, so its limit is patched in.  With room,
    the checked executable trains exactly as the jitted step; without, the run stops before its
    first step and names the micro-batch that fits by the compiler's figures."""
    from regift_jax.core import memory as core_memory
    from regift_jax.training import memory as train_memory
    seen, real_check = [], train_memory.check

    def spy(mem, limit, **kw):
        seen.append((mem, kw))
        return real_check(mem, limit, **kw)

    monkeypatch.setattr(train_memory, "check", spy)
    monkeypatch.setattr(core_memory, "device_limit", lambda device: 64 * 1024 ** 3)
    res = train.run_training(make_config(tiny_dir, cache_dir), str(tmp_path / "room"))
    assert losses(res["history"]) == losses(ref["history"])
    mem, kw = seen[0]
    assert kw["rows"] == kw["global_batch"] == 8 and kw["accum_bytes"] > 0
    fixed = mem.total - mem.temporaries + kw["accum_bytes"]
    limit = int((fixed + 0.55 * mem.temporaries) / train_memory.PLAN_FRACTION)
    assert mem.total > limit  # half the activations fit, all of them do not
    monkeypatch.setattr(core_memory, "device_limit", lambda device: limit)
    with pytest.raises(train_memory.StepMemoryError,
                       match=r"does not fit.*micro_batch=4 \(2 micro-batches"):
        train.run_training(make_config(tiny_dir, cache_dir), str(tmp_path / "tight"))
    assert not os.path.isdir(os.path.join(tmp_path, "tight", "checkpoints", "1"))


def test_splash_attention_trains_like_einsum(ref, tiny_dir, cache_dir, tmp_path):
    """``model.attention_impl="splash"``: the trainer traces its steps under the mesh
    (decoder.trace_context), where the Pallas kernel (interpreted off TPU) runs in shard_map; the
    losses follow the einsum reference run's."""
    cfg = make_config(tiny_dir, cache_dir, model__attention_impl="splash", train__num_steps=2,
                      checkpoint__every_steps=-1, eval__every_steps=-1)
    res = train.run_training(cfg, str(tmp_path / "splash"))
    np.testing.assert_allclose(losses(res["history"]), losses(ref["history"])[:2], rtol=2e-5)
