"""Ablation and baseline presets (configs/ablations.py) and the runner (scripts/run_presets.py).

Nothing here trains or loads a model.  Independent references: the number of correct training
traces is recounted from the JSONL with this file's own sha256 held-out split and correctness
filter (the trainer's rule, re-implemented); the subsample sizes are hand-computed for a synthetic
trace set; the Markdown rows are written out by hand from the fake experiment.json values; the
runner's loop is exercised with a fake interpreter that writes an experiment.json.
"""

import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from regift_jax.core import configs_util
from regift_jax.data import records as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "ablations.py")
SCRIPT = os.path.join(REPO, "scripts", "run_presets.py")
TRACES = os.path.join(REPO, "data", "traces")


def cfg(arg):
    return configs_util.load_config_file(f"{CONFIG}:{arg}")


def _runner():
    spec = importlib.util.spec_from_file_location("run_presets_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def held_out(qid, fraction=0.05, salt=""):
    return int(hashlib.sha256((salt + qid).encode()).hexdigest(), 16) < fraction * 2 ** 256


def make_record(i, correct, qid=None):
    reasoning, answer = f"Step {i}: the context names Paris.", "Paris"
    return {
        "id": qid or f"q{i:03d}", "context": "Paris is the capital of France.",
        "question": "What is the capital of France?", "gold_answers": ["Paris"],
        "is_impossible": False, "teacher": "t", "prompt_version": "v1",
        "decoding": {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 64,
                     "seed": 0},
        "sample_index": 0,
        "raw_generation": f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>",
        "reasoning": reasoning, "answer": answer, "exact_match": float(correct),
        "f1": float(correct), "lenient_correct": correct, "reasoning_tokens": 7,
        "prompt_tokens": 30, "generated_tokens": 15,
    }


# ============================================================================ presets
def test_every_preset_builds_with_its_data_epochs_and_workdir():
    recs, _ = R.read_trace_jsonl(TRACES)
    n_correct = sum(1 for r in recs if r.lenient_correct and not held_out(r.id))
    assert n_correct >= 1000  # the shipped set: 2,407 correct, a few of them held out
    expect_sel = {"correct": "correct", "incorrect": "incorrect", "all": "all", "cot": "correct"}
    sizes = {}
    mod = configs_util.load_module(CONFIG)
    assert mod.PRESETS == ("correct", "incorrect", "all", "frac20", "frac40", "frac60", "frac80",
                           "frac100", "cot", "instruction")
    for p in mod.PRESETS:
        c = cfg(p)
        assert c.workdir == f"runs/ablations/{p}", p
        assert c.experiment.enabled, p
        assert c.train.num_steps == -1 and c.train.num_epochs == 5.0, p
        assert c.model.name == "smollm2-135m-instruct" and c.lora.enabled, p
        assert c.train.global_batch == 4 and c.data.seq_len == 512, p  # the SmolLM2 preset
        if p in expect_sel:
            assert (c.data.kind, c.data.selection, c.data.max_examples) == (
                "traces", expect_sel[p], -1), p
        elif p.startswith("frac"):
            assert (c.data.kind, c.data.selection) == ("traces", "correct")
            sizes[p] = c.data.max_examples
        if p != "instruction":  # the default source: the TFDS builder config of the selection
            assert c.data.source == f"tfds:regift_traces/{c.data.selection}", p
    # fractions of the correct training traces, rounded half up, strictly increasing here
    for p, f in (("frac20", .2), ("frac40", .4), ("frac60", .6), ("frac80", .8),
                 ("frac100", 1.0)):
        assert sizes[p] == max(1, int(f * n_correct + 0.5)), p
    order = [sizes[p] for p in ("frac20", "frac40", "frac60", "frac80", "frac100")]
    assert order == sorted(set(order)) and order[-1] == n_correct

    cot = cfg("cot")
    assert cot.experiment.modes == "generate"
    assert cot.experiment.generate.prompt == "bbq_cot"
    assert cot.experiment.generate.max_new_tokens == mod.COT_MAX_NEW_TOKENS
    inst = cfg("instruction")
    assert (inst.data.kind, inst.data.template) == ("squad_gold", "instruction_baseline")
    assert inst.data.squad_split == "pool" and inst.data.max_examples == n_correct
    assert cfg("preset=all,epochs=2").train.num_epochs == 2.0
    assert cfg("all").data.selection == "all"


def test_unknown_preset_and_bad_arguments():
    with pytest.raises(ValueError, match="valid: correct, incorrect, all, frac20"):
        cfg("frac30")
    with pytest.raises(ValueError, match="eval_before"):
        cfg("base_only")
    with pytest.raises(ValueError, match="epochs"):
        cfg("preset=correct,epochs=0")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cfg("preset=frac20,source=/nowhere/traces")


def test_fractions_on_a_synthetic_trace_set_are_nested_prefixes_of_the_trainer_list(tmp_path):
    # 40 questions, every third one incorrect; plus lines the reader drops: malformed JSON and a
    # "correct" record whose teacher output is unparseable (never training data).
    lines = [json.dumps(make_record(i, i % 3 != 2)) for i in range(40)]
    bad = make_record(99, True)
    bad["raw_generation"] = "<think>\nR\n</think>\n<answer>Paris"  # missing </answer>
    lines += ["{not json", json.dumps(bad)]
    shard = tmp_path / "traces" / "traces-p00000.jsonl"
    shard.parent.mkdir()
    shard.write_text("\n".join(lines) + "\n")
    ids = [f"q{i:03d}" for i in range(40) if i % 3 != 2]
    train_ids = [q for q in ids if not held_out(q)]
    n = len(train_ids)
    assert len(ids) == 27 and 20 <= n <= 27
    src = str(shard.parent)
    from regift_jax.training import examples
    sizes = {}
    for p, f in (("frac20", .2), ("frac40", .4), ("frac60", .6), ("frac80", .8),
                 ("frac100", 1.0)):
        c = cfg(f"preset={p},source={src}")
        assert c.data.source == src
        assert c.data.max_examples == int(f * n + 0.5), p
        # what the trainer would train on: the first max_examples of its training split
        ex, _ = examples.load_examples(c.data)
        tr, _ = examples.split_heldout(ex, float(c.data.eval_fraction), str(c.data.eval_salt))
        sizes[p] = [e["id"] for e in tr[:int(c.data.max_examples)]]
        assert sizes[p] == train_ids[:c.data.max_examples], p
    assert sizes["frac100"] == train_ids
    seq = [sizes[p] for p in ("frac20", "frac40", "frac60", "frac80", "frac100")]
    for a, b in zip(seq, seq[1:]):
        assert len(a) < len(b) and b[:len(a)] == a  # nested, increasing


# ============================================================================ the table
HEAD = ("acc_overall", "acc_ambig", "acc_disambig", "paper_acc_overall", "s_dis", "s_amb",
        "unparseable_rate_overall")


def _exp(modes, step=15, loss=1.23456, eval_loss=2.5):
    return {"model": "smollm2-135m-instruct", "traces": "", "modes": {
        m: {"prompt": prompt, "n_items": n, "verdict": "",
            "before": dict(zip(HEAD, before)), "after": dict(zip(HEAD, after))}
        for m, (prompt, n, before, after) in modes.items()},
        "training": {"step": step, "total_steps": step, "train": {"loss": loss},
                     "eval": {"loss": eval_loss}, "wall_time_s": 1.0}}


def _write(runs, preset, exp):
    d = runs / preset
    d.mkdir(parents=True, exist_ok=True)
    (d / "experiment.json").write_text(json.dumps(exp))


FAKE_CORRECT = _exp({"loglik": ("bbq_base", 22, (.5, .25, .75, None, .1, -.05, 0.0),
                                (.625, .375, .875, None, .05, -.025, 0.0))})
FAKE_COT = _exp({"generate": ("bbq_cot", 22, (.375, .125, .5, .25, .2, .1, .125),
                              (.4375, .25, .625, .3125, 0.0, .0625, 0.0))},
                step=3, loss=0.75, eval_loss=0.8125)


def test_table_from_two_fake_experiment_files(tmp_path):
    rp = _runner()
    assert rp.HEADLINE == HEAD
    runs = tmp_path / "runs"
    _write(runs, "correct", FAKE_CORRECT)
    _write(runs, "cot", FAKE_COT)
    res = rp.assemble(str(runs), ["correct", "cot", "all"])
    md = (runs / "comparison.md").read_text()
    assert md == res["markdown"]
    lines = md.splitlines()
    # All runs: before -> after in percent, steps, losses
    assert ("| correct | loglik | bbq_base | 22 | 15 | 1.2346 | 2.5000 | 50.0 → 62.5 | "
            "25.0 → 37.5 | 75.0 → 87.5 | — → — | 10.0 → 5.0 | -5.0 → -2.5 | 0.0 → 0.0 |"
            ) in lines
    assert ("| cot | generate | bbq_cot | 22 | 3 | 0.7500 | 0.8125 | 37.5 → 43.8 | "
            "12.5 → 25.0 | 50.0 → 62.5 | 25.0 → 31.2 | 20.0 → 0.0 | 10.0 → 6.2 | "
            "12.5 → 0.0 |") in lines
    # Base model rows (before), one per (mode, prompt)
    assert "| loglik | bbq_base | 22 | 50.0 | 25.0 | 75.0 | — | 10.0 | -5.0 | 0.0 | correct |" \
        in lines
    assert "| generate | bbq_cot | 22 | 37.5 | 12.5 | 50.0 | 25.0 | 20.0 | 10.0 | 12.5 | cot |" \
        in lines
    # Table 3: Base = correct's before, CoT = cot's before, ReGiFT = correct's after
    assert "| Base | correct (before) | loglik | bbq_base | 50.0 | 25.0 | 75.0 | — | 10.0 | " \
        "-5.0 | 0.0 |" in lines
    assert "| CoT prompting | cot (before) | generate | bbq_cot | 37.5 | 12.5 | 50.0 | 25.0 | " \
        "20.0 | 10.0 | 12.5 |" in lines
    assert "| ReGiFT | correct (after) | loglik | bbq_base | 62.5 | 37.5 | 87.5 | — | 5.0 | " \
        "-2.5 | 0.0 |" in lines
    assert not any(ln.startswith("| Instruction") for ln in lines)
    assert f"- all: no {runs / 'all' / 'experiment.json'}" in lines
    assert "Warning" not in md
    js = json.loads((runs / "comparison.json").read_text())
    assert js["units"] == "percent" and js["metrics"] == list(HEAD)
    r0 = js["rows"][0]
    assert (r0["preset"], r0["mode"], r0["steps"], r0["train_loss"]) == (
        "correct", "loglik", 15, 1.23456)
    assert r0["after"]["acc_overall"] == pytest.approx(62.5)
    assert r0["before"]["paper_acc_overall"] is None
    assert [m["preset"] for m in js["missing"]] == ["all"]


def test_base_rows_disagreement_and_bad_result_file(tmp_path, capsys):
    rp = _runner()
    runs = tmp_path / "runs"
    _write(runs, "correct", FAKE_CORRECT)
    other = _exp({"loglik": ("bbq_base", 22, (.5, .25, .75, None, .1, -.0625, 0.0),
                             (.5, .25, .75, None, .1, -.05, 0.0))})
    _write(runs, "incorrect", other)
    (runs / "all").mkdir()
    (runs / "all" / "experiment.json").write_text('{"modes": {"loglik": {"before": {}}}}')
    res = rp.assemble(str(runs), ["correct", "incorrect", "all"])
    assert res["base_disagreements"] == [
        "base model (loglik, bbq_base): run 'incorrect' disagrees with 'correct' on s_amb"]
    assert "| loglik | bbq_base | 22 | 50.0 | 25.0 | 75.0 | — | 10.0 | -5.0 | 0.0 | " \
        "correct, incorrect |" in res["markdown"].splitlines()
    assert "modes.loglik.after missing" in res["missing"][0]["reason"]
    assert str(runs / "all" / "experiment.json") in res["missing"][0]["reason"]


# ============================================================================ the CLI
def test_dry_run_prints_the_commands_and_skips_finished_presets(tmp_path):
    runs = tmp_path / "runs"
    _write(runs, "cot", FAKE_COT)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = subprocess.run(
        [sys.executable, SCRIPT, "--presets=correct,frac20,cot", "--dry_run",
         f"--runs_dir={runs}", "--extra=--config.train.num_epochs=2 --config.seed=1"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    py = sys.executable
    assert out.stdout.splitlines() == [
        f"{py} -m regift_jax.train --config=configs/ablations.py:correct "
        f"--workdir={runs}/correct --config.train.num_epochs=2 --config.seed=1",
        f"{py} -m regift_jax.train --config=configs/ablations.py:frac20 "
        f"--workdir={runs}/frac20 --config.train.num_epochs=2 --config.seed=1",
        f"# skip cot: {runs}/cot/experiment.json exists",
    ]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # wrote nothing


def test_cli_refuses_unknown_presets_and_stale_counts(tmp_path, capsys):
    rp = _runner()
    assert rp.main(["--presets=correct,frac30", "--dry_run", f"--runs_dir={tmp_path}"]) == 2
    assert "frac30" in capsys.readouterr().err
    assert rp.main(["--presets=frac40", "--dry_run", f"--runs_dir={tmp_path}",
                    "--extra=--config.data.eval_fraction=0.1"]) == 2
    assert "data.eval_fraction" in capsys.readouterr().err
    # keys the count does not depend on are fine for counted presets
    assert rp.main(["--presets=frac40", "--dry_run", f"--runs_dir={tmp_path}",
                    "--extra=--config.train.num_epochs=3"]) == 0
    # a trace-set override is fine for presets that do not count
    assert rp.main(["--presets=all", "--dry_run", f"--runs_dir={tmp_path}",
                    "--extra=--config.data.source=x"]) == 0
    assert rp.main(["--presets=all", "--dry_run", "--extra=--workdir=/x"]) == 2


FAKE_TRAIN = r'''
import json, os, sys
args = sys.argv[1:]
assert args[:2] == ["-m", "regift_jax.train"], args
wd = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")][0]
preset = [a for a in args if a.startswith("--config=")][0].rsplit(":", 1)[1]
print("fake training", preset, flush=True)
if preset == "incorrect":
    sys.exit(3)
os.makedirs(wd, exist_ok=True)
json.dump(json.loads(os.environ["FAKE_EXP"]), open(os.path.join(wd, "experiment.json"), "w"))
'''


def test_run_loop_with_a_fake_trainer_is_resumable(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_TRAIN)
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    env = dict(os.environ, FAKE_EXP=json.dumps(FAKE_CORRECT))
    cmd = [sys.executable, SCRIPT, "--presets=correct,incorrect", f"--runs_dir={runs}",
           f"--python={fake}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1  # incorrect failed, the batch went on and reported it
    assert "fake training correct" in out.stdout and "incorrect FAILED (exit 3)" in out.stdout
    assert "fake training correct" in (runs / "correct" / "run_presets.log").read_text()
    md = (runs / "comparison.md").read_text()
    assert "| correct | loglik | bbq_base | 22 | 15 |" in md
    assert f"- incorrect: no {runs}/incorrect/experiment.json" in md
    out2 = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert "correct: skipped" in out2.stdout and "fake training correct" not in out2.stdout
    assert "fake training incorrect" in out2.stdout
    # --table_only without --presets: every preset of the config that has a result
    out3 = subprocess.run([sys.executable, SCRIPT, "--table_only", f"--runs_dir={runs}"],
                          capture_output=True, text=True, timeout=60)
    assert out3.returncode == 0, out3.stderr
    assert "Missing runs" not in (runs / "comparison.md").read_text()
    assert "| correct | loglik | bbq_base |" in (runs / "comparison.md").read_text()
