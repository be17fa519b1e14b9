"""The evaluation config: base config and presets, the command line (flag aliases, --config files,
--config.KEY overrides and their errors), the data root (REGIFT_DATA_DIR) and a JAX-free import."""

import json
import os
import re
import subprocess
import sys

import pytest

from regift_jax import evaluate
from regift_jax.core import configs_util
from regift_jax.eval import config as ec
from _data import REPO, bbq_dir, cli_env

# Every flag of the former argparse parser with its default: the flags stay, as config aliases.
OLD_DEFAULTS = {
    "--generations": None, "--model": None, "--category": "", "--categories": "",
    "--bbq_dir": "", "--tie_break": "first", "--overlap_threshold": 0.8,
    "--bootstrap_resamples": 1000, "--confidence": 0.95, "--seed": 0, "--title": None,
    "--reference_static": None, "--compare": None, "--compare_labels": "before,after",
    "--letter_options": False, "--strict": False, "--xla_cpu_flags": "config",
    "--mode": "loglik", "--prompt": "bbq_base", "--chat": "auto", "--system": None,
    "--max_items": None, "--max_items_per_category": None, "--subset_seed": 0,
    "--batch_size": 8, "--max_new_tokens": None, "--stop": None, "--temperature": 0.0,
    "--top_p": 1.0, "--top_k": 0, "--sample_seed": 0, "--loglik_method": "prefix",
    "--seq_len": 512, "--answer_format": "{option}", "--dtype": None, "--mesh": None,
    "--stereoset_file": "", "--stereoset_splits": "intrasentence,intersentence",
    "--no_progress": True, "--out": "",
}
# ("" for --bbq_dir / --stereoset_file / --category: resolved when the run starts; --no_progress
# is the negation of runtime.progress.)


def _flag_keys():
    return {f: key for flags, key, _ in ec.FLAGS for f in flags}


def test_every_former_flag_is_an_alias_with_its_default():
    base = ec.base_config()
    keys = _flag_keys()
    assert set(keys) == set(OLD_DEFAULTS)
    for flag, default in OLD_DEFAULTS.items():
        configs_util.check_key(base, keys[flag])
        assert ec.get(base, keys[flag]) == default, flag
    out = subprocess.run([sys.executable, "-m", "regift_jax.evaluate", "--help"], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in list(OLD_DEFAULTS) + ["--config"]:
        assert flag in out.stdout


def test_flags_overrides_and_order():
    cfg = ec.from_argv(["--model=m", "--mode=generate", "--categories=Age,Religion", "--stop=",
                        "--no_progress", "--letter_options", "--max_items=9",
                        "--config.generate.temperature=0.5", "--config.data.subset_seed", "3",
                        "--noconfig.judge.letter_options",
                        "--config.generate.stop=('</answer>',)", "--config.judge.strict",
                        "--config.prompt.system=None"])
    assert (cfg.model, cfg.mode, cfg.data.categories) == ("m", "generate", "Age,Religion")
    assert ec.categories(cfg) == ["Age", "Religion"]
    assert cfg.runtime.progress is False and cfg.data.max_items == 9
    assert cfg.generate.temperature == 0.5 and cfg.data.subset_seed == 3
    assert cfg.judge.letter_options is False  # --config.* comes after the flag aliases
    assert cfg.judge.strict is True and cfg.prompt.system is None
    assert cfg.generate.stop == ("</answer>",)
    assert ec.from_argv(["--stop=", "--stop="]).generate.stop == ()  # --stop= alone: none
    assert ec.from_argv(["--stop=a", "--stop=b"]).generate.stop == ("a", "b")
    assert ec.from_argv(["--category=Age"]).data.categories == "Age"


@pytest.mark.parametrize("argv,msg", [
    (["--config.data.nope=1"], r"unknown config key 'data\.nope'.*valid keys in section "
                               r"'data': bbq_dir, categories"),
    (["--config.modee=x"], r"did you mean 'mode'"),
    (["--config.data.max_items=x"], r"--config\.data\.max_items='x' is not a valid int"),
    (["--config.mode=foo"], r"mode='foo'; valid: loglik, generate, stereoset"),
    (["--config.report.seed"], r"--config\.report\.seed needs a value"),
    (["--config.judge.strict=maybe"], r"expected a boolean"),
    (["--config=configs/nope.py"], r"--config=configs/nope\.py: config file .* not found"),
    (["--config=configs/eval.py:fancy"], r"unknown preset 'fancy'; valid: loglik, generate"),
])
def test_bad_keys_and_values_are_clear_errors(argv, msg, capsys):
    with pytest.raises(ec.InputError, match=msg):
        ec.from_argv(argv)
    assert evaluate.main(argv + ["--out=/nonexistent"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_presets_change_values_never_keys():
    base_keys = configs_util.flat_keys(ec.base_config())
    for preset, (mode, template) in {"loglik": ("loglik", "bbq_base"),
                                     "generate": ("generate", "bbq_reasoning"),
                                     "cot": ("generate", "bbq_cot"),
                                     "stereoset": ("stereoset", "bbq_base")}.items():
        c = configs_util.load_config_file(f"configs/eval.py:{preset}")
        assert configs_util.flat_keys(c) == base_keys
        assert (c.preset, c.mode, c.prompt.template) == (preset, mode, template)
    assert configs_util.load_config_file("configs/eval.py").preset == "loglik"
    cfg = ec.from_argv(["--config=configs/eval.py:cot", "--prompt=bbq_reasoning",
                        "--config.generate.max_new_tokens=16"])
    assert (cfg.mode, cfg.prompt.template, cfg.generate.max_new_tokens) == (
        "generate", "bbq_reasoning", 16)
    with pytest.raises(AttributeError):  # locked: presets and callers cannot add keys
        ec.base_config().new_key = 1
    with pytest.raises(ValueError, match="configs/eval.py"):
        ec.get_config("generate")


def test_import_mode_uses_the_data_root(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    (root / "bbq").mkdir(parents=True)
    with open(os.path.join(bbq_dir(), "Religion.jsonl")) as f:
        rows = [json.loads(next(f)) for _ in range(4)]
    (root / "bbq" / "Religion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps({"example_id": r["example_id"], "generation": "Unknown."})
                         + "\n" for r in rows))
    monkeypatch.setenv("REGIFT_DATA_DIR", str(root))
    out = tmp_path / "out"
    argv = [f"--generations={g}", "--category=Religion", f"--out={out}",
            "--bootstrap_resamples=0"]
    assert evaluate.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["bbq_dir"] == str(root / "bbq")
    assert rep["metrics"]["total"]["n_total"] == 4
    (root / "bbq" / "Religion.jsonl").unlink()
    (root / "bbq").rmdir()
    assert evaluate.main(argv) == 2
    assert "has no 'bbq/' sub-directory" in capsys.readouterr().err


def test_config_import_needs_no_jax_and_never_reads_the_data_root():
    env = dict(cli_env(), REGIFT_DATA_DIR="/nonexistent/regift")
    code = ("import sys; import regift_jax.evaluate, regift_jax.eval.config; "
            "assert 'jax' not in sys.modules, 'jax imported'; "
            "import regift_jax.eval.evaluate, regift_jax.experiment, configs")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_generation_presets_carry_their_budget_and_paper_eval_is_the_authors_run():
    base_keys = configs_util.flat_keys(ec.base_config())
    for preset in ("generate", "cot", "paper_eval"):
        c = configs_util.load_config_file(f"configs/eval.py:{preset}")
        assert configs_util.flat_keys(c) == base_keys and c.mode == "generate"
    for preset in ("generate", "cot"):  # a reasoning student is not cut off at 64 tokens
        assert configs_util.load_config_file(
            f"configs/eval.py:{preset}").generate.max_new_tokens == 512
    p = configs_util.load_config_file("configs/eval.py:paper_eval")
    assert p.prompt.template == "bbq_authors_released" and p.prompt.chat == "off"
    assert p.generate.temperature == 0.0 and p.generate.max_total_tokens == 2048
    assert p.generate.max_new_tokens is None and p.generate.stop == ()
    assert p.generate.score_prefill is False  # the generation alone is judged
    cfg = ec.from_argv(["--config=configs/eval.py:paper_eval",
                        "--config.generate.max_total_tokens=4096"])
    assert cfg.generate.max_total_tokens == 4096


def test_distributed_section_has_the_training_keys():
    train = configs_util.load_config_file("configs/llama.py").distributed
    ev = ec.base_config().distributed
    assert sorted(ev.keys()) == sorted(train.keys())
    assert ev.to_dict() == train.to_dict()
    with pytest.raises(ec.InputError, match="distributed.initialize='sometimes'"):
        ec.from_argv(["--config.distributed.initialize=sometimes"])


@pytest.mark.parametrize("argv,msg", [
    (["--max_items=abc"], r"argument --max_items: invalid int value: 'abc' \(see --help\)"),
    (["--mode=vibes"], r"argument --mode: invalid choice: 'vibes'"),
    (["--no_such_flag"], r"unrecognized arguments: --no_such_flag"),
])
def test_malformed_flags_are_one_line_errors(argv, msg, capsys):
    assert evaluate.main(argv + ["--out=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err
    assert re.search(msg, err), err


def test_lm_eval_preset_scores_lm_evals_requests_raw():
    c = configs_util.load_config_file("configs/eval.py:lm_eval")
    assert (c.mode, c.loglik.format, c.prompt.chat) == ("loglik", "lm_eval", "off")
    cfg = ec.from_argv(["--config=configs/eval.py:lm_eval", "--model=m", "--out=o"])
    assert cfg.loglik.format == "lm_eval"
