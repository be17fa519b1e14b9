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


def _two_processes(argv, expect_rc=0):
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
        assert p.returncode == expect_rc, out[-4000:]
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


def test_an_error_on_one_share_stops_every_process(model_dir, tmp_path):
    """A request too long for loglik.seq_len fails inside process 0's share only (its Religion
    prompts are the long ones): both processes exit with the one-line error instead of
    process 1 waiting forever in the gather."""
    argv = _argv(model_dir, "loglik", tmp_path / "out") + ["--seq_len=400"]
    outs = _two_processes(argv, expect_rc=2)
    for out in outs:
        err = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and "process 0: " in err[0] and "exceed seq_len=400" in err[0], \
            out[-2000:]
        assert "Traceback" not in out


def test_distributed_settings_follow_the_training_command_line(monkeypatch):
    from regift_jax.core.distributed import distributed_kwargs
    from regift_jax.eval import config as ec
    from regift_jax.eval import hosts
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    d = ec.base_config().distributed
    assert distributed_kwargs(d) is None  # one process: nothing to initialise
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed_kwargs(d) == {"coordinator_address": "host:1234",
                                           "num_processes": 2, "process_id": 0,
                                           "initialization_timeout": 300}
    d.process_id, d.initialization_timeout = 1, 60
    assert distributed_kwargs(d)["process_id"] == 1
    d.initialize = "never"
    assert distributed_kwargs(d) is None
    assert hosts.share(10) == (0, 10) and hosts.gather({"a": 1}) == [{"a": 1}]
