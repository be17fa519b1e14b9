"""benchmarks/device_h200.sh, the script a lent GPU runs with a 15-minute budget: its CPU smoke
mode (tiny Llama, bf16) must run every phase of both stacks without an error, and the fast paths
it measures (dot_product_attention + chunked loss) must train the same model as the control
phase (einsum attention, full logits) on the same batch."""

import json
import os
import subprocess
import sys

import pytest

from _data import REPO, cli_env

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_device_script_smoke_runs_every_phase(tmp_path):
    env = cli_env()
    env.update(SMOKE="1", FULL="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_h200.sh"),
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    j = json.load(open(tmp_path / "device_jax.json"))
    t = json.load(open(tmp_path / "device_torch.json"))
    for res, keys in ((j, ("train_lora", "train_lora_einsum", "train_full", "generate")),
                      (t, ("train_lora", "generate"))):
        for k in keys:
            assert "error" not in res[k], (k, res[k])
            assert res[k]["tokens_per_s"] > 0
    # smoke mode swaps cuDNN for the same call's XLA implementation
    assert j["train_lora"]["attention_impl"] == "xla" and j["train_lora"]["loss_chunk"] == 2048
    assert j["train_lora_einsum"]["attention_impl"] == "einsum"
    # same model, batch and LoRA init: the first losses agree (bf16 compute)
    assert abs(j["train_lora"]["loss_first"] - j["train_lora_einsum"]["loss_first"]) < 2e-2
    report = (tmp_path / "device_report.md").read_text()
    assert "ERROR" not in report and "control: LoRA" in report
