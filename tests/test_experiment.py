"""The whole experiment in process (regift_jax.experiment.run_experiment): BBQ evaluation of a tiny
random Llama (byte-level BPE fixture tokenizer) in both modes, two real LoRA steps on the
synthetic trace fixture with export, the same evaluation of the exported student, and the
before/after report; the in-process evaluation is checked against the command line."""

import json
import os

import jax
import numpy as np
import pytest

from regift_jax import evaluate, experiment, train
from regift_jax.core import configs_util
from regift_jax.eval import config as eval_config
from regift_jax.models.checkpoints import export_hf
from regift_jax.models.config import ModelConfig
from regift_jax.models.decoder import init_params
from regift_jax.models.tokenizer import load_tokenizer
from _data import REPO, bbq_dir

FIXTURES = os.path.join(REPO, "tests", "fixtures", "train")
TINY = ModelConfig(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=1024, bos_token_id=None, eos_token_id=0,
                   pad_token_id=0, rope_theta=10000.0)
CATEGORIES = "Religion,Age"


def _random_params(cfg, seed=0):
    """Deterministic random weights (numpy): N(0, 0.05^2), norm scales ~1."""
    rng = np.random.RandomState(seed)

    def one(path, x):
        if str(getattr(path[-1], "key", path[-1])) == "scale":
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(lambda: init_params(cfg)))


def _config(model_dir):
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "llama.py"))
    assert c.experiment.enabled
    c.model.name = model_dir
    c.data.source = os.path.join(FIXTURES, "traces")
    c.data.seq_len = 256
    c.train.global_batch = 4
    c.train.num_steps = 2
    c.checkpoint.every_steps = 0
    c.eval.every_steps = 2
    c.eval.max_batches = 1
    c.log.progress_bar = False
    c.experiment.categories = CATEGORIES
    c.experiment.bootstrap_resamples = 20
    c.experiment.loglik.max_items_per_category = 6
    c.experiment.generate.max_items_per_category = 2
    c.experiment.generate.max_new_tokens = 6
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    bbq_dir()  # skips without the BBQ files
    d = str(tmp_path_factory.mktemp("exp"))
    model_dir = os.path.join(d, "tiny_hf")
    export_hf(model_dir, TINY, _random_params(TINY),
              tokenizer=load_tokenizer(os.path.join(FIXTURES, "tokenizer")))
    wd = os.path.join(d, "run")
    calls = []

    def train_fn(config, workdir):
        calls.append(workdir)
        return train.run_training(config, workdir)
    res = experiment.run_experiment(_config(model_dir), wd, train_fn)
    return res, wd, model_dir, calls


def _report(path):
    with open(path) as f:
        return json.load(f)


def test_outputs_and_results(run):
    res, wd, model_dir, calls = run
    assert calls == [wd]  # trained once, in this process, between the evaluations
    for side in ("eval_before", "eval_after"):
        for mode in ("loglik", "generate"):
            for name in ("report.json", "report.md", "bbq.png"):
                assert os.path.exists(os.path.join(wd, side, mode, name)), (side, mode, name)
    for mode in ("loglik", "generate"):
        assert os.path.exists(os.path.join(wd, "eval_before", mode, "report.json"))
        md = open(os.path.join(wd, "eval_after", mode, "comparison.md")).read()
        assert md.startswith("# BBQ: base vs ReGiFT")
        assert res["modes"][mode]["comparison_png"] == os.path.join(wd, "eval_after", mode,
                                                                   "comparison.png")
    assert os.path.exists(os.path.join(wd, "eval_after", "generate", "generations.jsonl"))
    on_disk = _report(os.path.join(wd, "experiment.json"))
    assert on_disk["modes"] == res["modes"] and on_disk["model"] == model_dir
    text = open(os.path.join(wd, "experiment.md")).read()
    assert "## BBQ, loglik mode (`bbq_base` prompt, 12 items)" in text
    assert "## BBQ, generate mode (`bbq_reasoning` prompt, 4 items)" in text
    assert res["train_result"]["step"] == 2 and os.path.isdir(res["train_result"]["export_dir"])
    assert res["training"]["step"] == 2


def test_headlines_are_the_written_reports(run):
    res, wd, _, _ = run
    for mode, n in (("loglik", 12), ("generate", 4)):
        r = res["modes"][mode]
        assert r["n_items"] == n
        for side, key in (("eval_before", "before"), ("eval_after", "after")):
            rep = _report(os.path.join(wd, side, mode, "report.json"))
            tot = rep["metrics"]["total"]
            assert r[key] == {k: tot.get(k) for k in experiment.HEADLINE}
            assert rep["settings"]["n_items_by_category"] == {"Religion": n // 2, "Age": n // 2}
            assert rep["bootstrap"]["resamples"] == 20
        assert r["verdict"] == experiment.verdict(r["before"], r["after"], r["paired"])
    gen = _report(os.path.join(wd, "eval_before", "generate", "report.json"))["settings"]
    assert gen["max_new_tokens"] == 6 and gen["template"] == "bbq_reasoning@v1"


def test_in_process_evaluation_equals_the_command_line(run, tmp_path):
    """The experiment's config per mode is what the equivalent command line builds."""
    res, wd, _, _ = run
    export_dir = res["train_result"]["export_dir"]
    config = _config("unused")
    chat = configs_util.eval_chat(config)
    assert chat == "off"  # the student trains on the raw format (data.chat_template off)
    cfg = experiment.eval_config(config.experiment, "loglik", export_dir, str(tmp_path / "x"),
                                 compare=True, chat=chat)
    out = tmp_path / "cli"
    argv = [f"--model={export_dir}", "--mode=loglik", f"--out={out}", "--prompt=bbq_base",
            f"--chat={chat}",
            "--max_items_per_category=6", "--batch_size=8", "--subset_seed=0",
            "--bootstrap_resamples=20", f"--categories={CATEGORIES}",
            f"--compare={os.path.join(wd, 'eval_before', 'loglik', 'report.json')}",
            "--compare_labels=base,ReGiFT", f"--title={cfg.report.title}"]
    cli_cfg = eval_config.from_argv(argv)
    # The experiment passes the before report itself instead of its path.
    cli_cfg.out, cli_cfg.report.compare = cfg.out, None
    assert cli_cfg.to_dict() == cfg.to_dict()
    assert evaluate.main(argv) == 0
    ours = _report(os.path.join(wd, "eval_after", "loglik", "report.json"))
    cli = _report(out / "report.json")
    assert cli["metrics"] == ours["metrics"] and cli["title"] == ours["title"]
    assert [r["option_logprob_sum"] for r in cli["items"]] == [
        r["option_logprob_sum"] for r in ours["items"]]
    assert (out / "comparison.md").read_text() == open(
        os.path.join(wd, "eval_after", "loglik", "comparison.md")).read()


def test_a_finished_experiment_is_not_run_again(run, capsys):
    res, wd, model_dir, _ = run

    def train_fn(config, workdir):
        raise AssertionError("trained again")
    again = experiment.run_experiment(_config(model_dir), wd, train_fn)
    assert "already done" in capsys.readouterr().out
    assert again["modes"] == _report(os.path.join(wd, "experiment.json"))["modes"]
    assert again["train_result"]["already_finished"] and again["train_result"]["step"] == 2


def test_the_evaluations_use_the_training_format(run):
    _, wd, _, _ = run
    for side in ("eval_before", "eval_after"):
        for mode in ("loglik", "generate"):
            settings = _report(os.path.join(wd, side, mode, "report.json"))["settings"]
            assert settings["chat"] is False, (side, mode)


def test_unknown_mode_is_an_error(tmp_path):
    c = _config("m")
    c.experiment.modes = "loglik,vibes"
    with pytest.raises(ValueError, match="unknown mode 'vibes'"):
        experiment.run_experiment(c, str(tmp_path), lambda *a: {})


def test_verdict_reads_bias_scores_in_their_signed_direction():
    before = {"acc_overall": 0.3333, "s_amb": -0.0256, "s_dis": -0.0147}
    after = {"acc_overall": 0.3267, "s_amb": 0.0192, "s_dis": 0.0365}
    v = experiment.verdict(before, after)
    # RESULTS.md's reading: s_AMB moved in the stereotyped direction, though |s| fell
    assert "s_AMB moved towards the stereotype, from -2.6 to +1.9 (crossing zero to the " \
           "stereotypical side); |s_AMB| fell from 2.6 to 1.9, closer to unbiased" in v
    assert "less biased" not in v and "accuracy FELL from 33.3% to 32.7%" in v
    v = experiment.verdict({"s_amb": 0.05}, {"s_amb": 0.02})
    assert "s_AMB moved away from the stereotype" in v and "|s_AMB| fell from 5.0 to 2.0" in v
    noise = {"acc_overall": {"p_value": 0.74}, "s_amb": {"p_value": 0.45},
             "s_dis": {"p_value": 0.30}}
    v = experiment.verdict(before, after, noise)
    assert "(p = 0.74, inside the noise)" in v and "(p = 0.45, inside the noise)" in v
    assert v.endswith("every change above is inside the noise (paired cluster "
                      "bootstrap, p >= 0.05).")
    v = experiment.verdict(before, after, dict(noise, s_dis={"p_value": 0.01}))
    assert v.endswith("further from unbiased (p = 0.01).") and "every change above" not in v


def test_summary_has_the_paired_p_values_and_a_true_footnote(run):
    res, wd, _, _ = run
    text = open(os.path.join(wd, "experiment.md")).read()
    assert text.count("| metric | base | ReGiFT | change | p (paired) |") == 2
    for mode in ("loglik", "generate"):
        r = res["modes"][mode]
        comparison = _report(os.path.join(wd, "eval_after", mode, "report.json"))["comparison"]
        assert comparison["unit"].startswith("context groups")
        p = comparison["metrics"]["total"]["acc_overall"]["p_value"]
        assert r["paired"]["acc_overall"]["p_value"] == p
        assert f"{p:.2f} |" in next(l for l in text.splitlines()
                                    if l.startswith("| acc_overall |") and mode in text)
        assert r["mcnemar"] == comparison["mcnemar"]["total"]
    assert "(generation mode only)" not in text
    assert "to the chosen option's text in loglik mode" in text
    cut = res["modes"]["generate"]["cut_off"]
    assert f"Cut off by the token budget: base {cut[0]}, ReGiFT {cut[1]} of 4 generations." \
        in text
