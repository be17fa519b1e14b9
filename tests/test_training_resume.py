"""Training as a user who makes mistakes drives it: a resume of another model or other data, other
settings, unreadable checkpoints, a rerun of a finished run, a read-only work directory, bad
optimiser values and a bad config argument.  Each test pins one defect of issue 15.

One finished 4-step LoRA run of the tiny random Llama of ``tests/test_trainer.py`` (``done``)
is copied into each test's own work directory; the runs share a persistent compilation cache.
"""

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_trainer import TINY, TRACES, _tokenizer, losses, make_config, random_params  # noqa: E402

from regift_jax import train  # noqa: E402
from regift_jax.models.checkpoints import export_hf  # noqa: E402
from regift_jax.training import identity, loop  # noqa: E402
from regift_jax.training.checkpointing import UNREADABLE_DIR  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache
    import jax
    before = jax.config.jax_compilation_cache_dir
    yield str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models of the same shapes and different weights."""
    out = []
    for seed in (0, 1):
        d = str(tmp_path_factory.mktemp(f"tiny_{seed}"))
        export_hf(d, TINY, random_params(TINY, seed=seed), tokenizer=_tokenizer())
        out.append(d)
    return out


def config(model_dir, cache, **over):
    over = {"train__num_steps": STEPS, "log__tensorboard": False, "eval__every_steps": -1,
            **over}
    return make_config(model_dir, cache, **over)


@pytest.fixture(scope="module")
def done(models, cache, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("done"))
    res = train.run_training(config(models[0], cache), wd)
    assert res["step"] == STEPS and not res["already_finished"]
    return res


def copy_run(done, tmp_path, name="wd"):
    wd = str(tmp_path / name)
    shutil.copytree(done["workdir"], wd)
    return wd


def metric_steps(wd, prefix="train"):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["step"] for r in recs if f"{prefix}/loss" in r]


def no_model_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(loop, "load_model", refuse)


# ============================================================================ identity
def test_run_records_its_identity(done, models):
    with open(os.path.join(done["workdir"], identity.RUN_FILE)) as f:
        rec = json.load(f)
    ident = rec["identity"]
    assert ident["model_fingerprint"].startswith("sha256:")
    assert ident["data"]["source_digest"].startswith("sha256:")
    assert (ident["data"]["selection"], ident["data"]["criterion"], ident["data"]["max_examples"],
            ident["seed"]) == ("correct", "lenient", -1, 0)
    assert rec["settings"]["optim.learning_rate"] == 1e-3
    assert rec["settings"]["train.num_steps"] == STEPS


def test_resume_with_another_model_is_refused_then_overridden(done, models, cache, tmp_path,
                                                              monkeypatch):
    wd = copy_run(done, tmp_path)
    with monkeypatch.context() as m:
        no_model_work(m)
        with pytest.raises(identity.RunIdentityError, match=r"model_fingerprint: 'sha256:"):
            train.run_training(config(models[1], cache), wd)
    res = train.run_training(config(models[1], cache, train__resume_override=True), wd)
    assert res["already_finished"] and res["step"] == STEPS  # restored step 4 of 4
    with open(os.path.join(wd, identity.RUN_FILE)) as f:
        rec = json.load(f)
    (entry,) = rec["resume_overrides"]
    assert list(entry["differences"]) == ["model_fingerprint"]


def test_resume_with_other_data_is_refused(done, models, cache, tmp_path, monkeypatch):
    wd = copy_run(done, tmp_path)
    traces = tmp_path / "traces"
    shutil.copytree(TRACES, traces)
    shard = next(traces.iterdir())
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:-1]))  # one record less
    no_model_work(monkeypatch)
    with pytest.raises(identity.RunIdentityError) as e:
        train.run_training(config(models[0], cache, data__source=str(traces)), wd)
    assert "data.source_digest" in str(e.value) and "resume_override" in str(e.value)
    with pytest.raises(identity.RunIdentityError, match=r"data.max_examples: -1 -> 10"):
        train.run_training(config(models[0], cache, data__max_examples=10), wd)


# ============================================================================ resume
def test_other_settings_warn_and_metrics_are_rewound(done, models, cache, tmp_path, caplog):
    """A run stopped after its step-2 checkpoint with metrics written up to step 4, resumed with
    another learning rate: a warning lists the change, and metrics.jsonl has each step once."""
    wd = copy_run(done, tmp_path)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    shutil.rmtree(os.path.join(wd, "data_state", "4"))
    assert metric_steps(wd) == [1, 2, 3, 4]
    with caplog.at_level(logging.WARNING, logger="regift_jax.training.loop"):
        res = train.run_training(config(models[0], cache, optim__learning_rate=5e-4), wd)
    msgs = [r.getMessage() for r in caplog.records
            if "differ from the checkpoint" in r.getMessage()]
    assert len(msgs) == 1 and "optim.learning_rate: 0.001 -> 0.0005" in msgs[0], msgs
    assert res["step"] == STEPS and len(losses(res["history"])) == 2  # steps 3 and 4 only
    assert metric_steps(wd) == [1, 2, 3, 4]
    assert metric_steps(wd, "eval") == [STEPS]


def test_no_usable_checkpoint_says_starting_from_step_0(done, models, cache, tmp_path, caplog):
    wd = copy_run(done, tmp_path)
    for step in ("2", "4"):
        os.remove(os.path.join(wd, "data_state", step, "process_0.json"))
    with caplog.at_level(logging.WARNING, logger="regift_jax.training.checkpointing"):
        res = train.run_training(config(models[0], cache, train__num_steps=1), wd)
    assert any("no usable checkpoint: starting from step 0" in r.getMessage()
               for r in caplog.records)
    assert len(os.listdir(os.path.join(wd, UNREADABLE_DIR))) == 4  # 2 steps x (state, data)
    assert res["step"] == 1 and metric_steps(wd) == [1]  # the old run's records are gone


def test_finished_run_is_not_trained_again(done, models, cache, monkeypatch):
    wd = done["workdir"]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        before = f.read()
    no_model_work(monkeypatch)
    assert loop.finished_run(config(models[0], cache), wd)["step"] == STEPS
    res = train.run_training(config(models[0], cache), wd)
    assert res["already_finished"] and res["step"] == STEPS
    assert res["train"]["loss"] == done["train"]["loss"]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert f.read() == before
    # More steps, or a finished run's checkpoint gone: not finished.
    assert loop.finished_run(config(models[0], cache, train__num_steps=STEPS + 2), wd) is None


def _cli(args, **env):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", "regift_jax.train", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)


def test_cli_rerun_of_a_finished_experiment_does_nothing(done, models, cache, tmp_path):
    """With the experiment on (the default preset) and its experiment.json present, a rerun
    neither trains nor evaluates: it says so and exits 0."""
    wd = copy_run(done, tmp_path)
    with open(os.path.join(wd, train.EXPERIMENT_FILE), "w") as f:
        json.dump({}, f)
    c = config(models[0], cache)
    over = {"model.name": models[0], "data.source": TRACES, "data.seq_len": c.data.seq_len,
            "train.global_batch": c.train.global_batch, "train.num_steps": STEPS,
            "export.enabled": False}
    p = _cli(["--config=configs/llama.py", f"--workdir={wd}"] +
             [f"--config.{k}={v}" for k, v in over.items()])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already finished" in p.stdout and "[experiment] already done" in p.stdout
    assert "stage 1" not in p.stdout  # no evaluation started


# ============================================================================ early errors
def test_unwritable_workdir_is_one_line_before_model_work(tmp_path, monkeypatch, models, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    no_model_work(monkeypatch)
    with pytest.raises(loop.WorkdirError, match="is not writable"):
        train.run_training(config(models[0], cache), str(blocker / "run"))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(loop.tempfile, "mkstemp", read_only)
    with pytest.raises(loop.WorkdirError, match="not writable: Read-only file system"):
        train.run_training(config(models[0], cache), str(tmp_path / "ro"))
    # The command line (experiment on: it would evaluate the base model first) says it in one
    # line, before anything else.
    p = _cli(["--config=configs/llama.py", f"--workdir={blocker / 'run'}"])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is not writable" in err[0]
    assert "stage 1" not in p.stdout


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", -1e-4, "optim.learning_rate=-0.0001 must be > 0"),
    ("warmup_steps", 10, "optim.warmup_steps=10 is more than the 4 steps"),
    ("weight_decay", -0.01, "optim.weight_decay=-0.01 must be >= 0"),
    ("b2", 1.0, "optim.b2=1.0 must be in [0, 1)"),
])
def test_bad_optimiser_values_are_refused(tmp_path, key, value, message):
    c = config("/nonexistent/model", "", **{f"optim__{key}": value})
    with pytest.raises(ValueError, match=re.escape(message)):
        train.run_training(c, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")  # refused before the work directory is made


def test_bad_config_argument_is_one_line(capsys):
    rc = train.main(["train", "--config=configs/llama.py:nope", "--workdir=/tmp/unused"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: configs/llama.py: unknown preset 'nope'; valid: smollm2_135m, llama3_1_8b, "
        "llama3_1_8b_full"]


def test_trained_losses_are_finite(done):
    assert np.all(np.isfinite(losses(done["history"])))
