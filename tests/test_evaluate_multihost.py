"""Multi-host evaluation on one machine: two processes (one CPU device each, gloo collectives)
started through the command line with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` (the training command line's variables).  Each process scores half of the
items; process 0 gathers them and writes the report, which must equal the report of one process
(the timings and the per-process prefix-sharing statistics aside)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from regift_jax import evaluate
from regift_jax.models.checkpoints import export_hf
from regift_jax.models.tokenizer import load_tokenizer
from _data import REPO, bbq_dir, cli_env
from test_experiment import FIXTURES, TINY, _random_params

FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
# Settings that describe the run, not its result.
RUN_ONLY = {"seconds", "items_per_second", "processes"}
LOGLIK_RUN_ONLY = {"shared_prefix_tokens", "tokens_real", "tokens_computed"}
FLOAT_FIELDS = ("option_logprob_sum", "option_logprob_per_byte", "option_logprob_mean")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    bbq_dir()  # skips without the BBQ files
    d = str(tmp_path_factory.mktemp("mh") / "tiny_hf")
    export_hf(d, TINY, _random_params(TINY),
              tokenizer=load_tokenizer(os.path.join(FIXTURES, "tokenizer")))
    return d


def _argv(model_dir, mode, out):
    return [f"--model={model_dir}", f"--mode={mode}", "--categories=Religion,Age",
            "--max_items_per_category=6", "--batch_size=4", "--max_new_tokens=5",
            "--prompt=bbq_reasoning", f"--bbq_dir={bbq_dir()}", "--bootstrap_resamples=50",
            "--no_progress", f"--out={out}"]


def _two_processes(argv):
    port = _free_port()
    cmd = [sys.executable, "-m", "regift_jax.evaluate"] + argv
    procs = []
    for pid in range(2):
        env = dict(cli_env(), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), XLA_FLAGS=FAST_COMPILE)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _comparable(rep):
    """``(report without run-only fields and log-probabilities, the log-probabilities)``: the
    shares share prompt prefixes in other batches than one process does, so a log-probability
    may differ in its last float32 bits (every judgement and metric is still equal)."""
    rep = dict(rep)
    rep["settings"] = {k: v for k, v in rep["settings"].items() if k not in RUN_ONLY}
    if "loglik" in rep:
        rep["loglik"] = {k: v for k, v in rep["loglik"].items() if k not in LOGLIK_RUN_ONLY}
    rep["settings"].pop("generations_file", None)
    floats = [[it.get(k) for k in FLOAT_FIELDS] for it in rep["items"]]
    rep["items"] = [{k: v for k, v in it.items() if k not in FLOAT_FIELDS}
                    for it in rep["items"]]
    return rep, floats


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_two_processes_write_the_one_process_report(model_dir, tmp_path, mode):
    multi = tmp_path / "multi"
    outs = _two_processes(_argv(model_dir, mode, multi))
    assert "wrote" in outs[0] and "wrote" not in outs[1]  # process 0 alone reports and writes
    single = tmp_path / "single"
    assert evaluate.main(_argv(model_dir, mode, single)) == 0
    got = json.loads((multi / "report.json").read_text())
    want = json.loads((single / "report.json").read_text())
    assert len(got["items"]) == 12
    assert got["settings"]["processes"] == 2 and want["settings"]["processes"] == 1
    (got, got_lp), (want, want_lp) = _comparable(got), _comparable(want)
    assert got == want
    for a, b in zip(got_lp, want_lp):
        for x, y in zip(a, b):
            assert x == y or np.allclose(x, y, rtol=1e-6, atol=0)
    assert (multi / "report.md").read_text() == (single / "report.md").read_text()
    if mode == "generate":
        assert (multi / "generations.jsonl").read_text() == \
            (single / "generations.jsonl").read_text()
