"""A dry run of the paper's trace step (issue 16): ``configs/teacher_qwen2.py:r1_distill_qwen_32b``
on a SQuAD-v2 *train*-format file, with a stub teacher that writes R1-shaped outputs.

The text comes from a fixed list (tests/fixtures/r1/outputs.jsonl: ``<think>`` with
self-corrections, the answer as plain text after ``</think>``, no ``<answer>``; two outputs that
run out of tokens inside ``<think>``; three with tags).  Everything else is the real pipeline:
the preset resolved to a local model directory and fingerprinted, the manifest, prompt rendering,
the parser, the judge, the part writer, compaction, the summary, and the ``regift_traces`` reader
with the paper's lenient criterion.
"""

import gzip
import json
import os
import re

import pytest

from regift_jax import models
from regift_jax.core import configs_util
from regift_jax.data import records as R
from regift_jax.models.sampling import Generation
from regift_jax.traces import generate as G

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SQUAD_TRAIN = os.path.join(HERE, "fixtures", "squad_train")
R1_OUTPUTS = os.path.join(HERE, "fixtures", "r1", "outputs.jsonl")


class CharTokenizer:
    """One id per character (its code point): the stub teacher needs no vocabulary, and the
    shared prompt prefix the pipeline encodes reads back exactly."""
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


class StubSampler:
    """Answers each prompt with the fixture output for its question, checking that the prompt and
    the decoding are the paper's."""

    def __init__(self, outputs, calls):
        self.outputs, self.calls = outputs, calls

    def generate(self, texts, sampling, row_seeds=None, prefix=None, then=None):
        assert then is None and sampling.temperature == 0.0 and sampling.max_new_tokens == 512
        out = []
        for text in texts:
            prompt = CharTokenizer.decode(prefix or []) + text
            assert prompt.startswith("### Instruction:\n") and prompt.endswith(
                "### Response:\n<think> Let's think step by step to answer the question.\n")
            question = re.search(r"\nQuestion:\n(.*)\n", prompt).group(1)
            o = self.outputs[question]
            self.calls.append(question)
            out.append(Generation(text=o["text"], token_ids=[], finish_reason=o["finish_reason"],
                                  prompt_tokens=len(prompt.split()),
                                  generated_tokens=o["generated_tokens"]))
        return out


class StubTeacher:
    def __init__(self, outputs, calls):
        self.tokenizer = CharTokenizer()
        self._sampler = StubSampler(outputs, calls)

    def sampler(self, **kwargs):
        return self._sampler


@pytest.fixture()
def paper_run(tmp_path, monkeypatch):
    """The paper preset, its teacher resolved from REGIFT_MODELS_DIR, the stub generating."""
    weights = tmp_path / "models" / "deepseek-r1-distill-qwen-32b"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text(json.dumps({
        "_name_or_path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        "architectures": ["Qwen2ForCausalLM"]}))
    (weights / "model.safetensors").write_bytes(b"stand-in weights")
    monkeypatch.setenv("REGIFT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("REGIFT_CACHE_DIR", str(tmp_path / "cache"))
    with open(os.path.join(SQUAD_TRAIN, "train-v2.0.json"), encoding="utf-8") as f:
        doc = json.load(f)
    question = {q["id"]: q["question"] for a in doc["data"] for p in a["paragraphs"]
                for q in p["qas"]}
    with open(R1_OUTPUTS, encoding="utf-8") as f:
        outputs = {question[o["id"]]: o for o in map(json.loads, f)}
    calls, loaded = [], []
    monkeypatch.setattr(models, "load", lambda path, **kw: loaded.append(path) or
                        StubTeacher(outputs, calls))
    cfg = configs_util.load_config_file(
        os.path.join(REPO, "configs", "teacher_qwen2.py:r1_distill_qwen_32b"))
    cfg.data.squad_dir = SQUAD_TRAIN
    cfg.out_dir = str(tmp_path / "traces")
    cfg.progress = False
    cfg.batch_size = 4
    cfg.teacher.mesh = ""  # the preset's mesh needs 8+ chips; the stub runs on one CPU device
    summary = G.run(cfg)
    return cfg, summary, calls, loaded, str(weights)


def test_dry_run_yields_a_correct_set_and_counts_per_answer_source(paper_run):
    cfg, summary, calls, loaded, weights = paper_run
    assert loaded == [weights] and len(calls) == 13  # every train question, once
    assert summary["outcomes"] == {
        "lines": 13, "kept": {"tag": {"n": 3, "correct": 3},
                              "after_think": {"n": 8, "correct": 6}},
        "dropped": {"unfinished <think>": 2}}
    assert summary["units_configured"] == summary["units_written"] == 13
    # the regift_traces reader with the paper's lenient criterion
    recs, report = R.read_trace_jsonl(cfg.out_dir)
    correct = R.select_records(recs, "correct", "lenient")
    assert (report.n_lines, report.n_records, len(correct)) == (13, 11, 9)
    assert dict(report.dropped) == {"unfinished <think>": 2}
    by_source = {s: sum(r.answer_source == s for r in correct) for s in R.ANSWER_SOURCES}
    assert by_source == {"tag": 3, "after_think": 6}
    r = next(x for x in correct if x.id == "56be85543aeaaa14008c9001")
    assert r.answer == "The Marnholt Observatory was built in **1874**."
    assert r.reasoning.startswith("Let's think step by step") and "Wait," in r.reasoning
    assert r.teacher == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert r.prompt_version == "teacher_extraction@v1" and r.decoding["max_new_tokens"] == 512


def test_dry_run_manifest_and_data_card(paper_run):
    cfg, _, _, _, weights = paper_run
    with open(os.path.join(cfg.out_dir, "manifest.json")) as f:
        m = json.load(f)
    assert m["teacher"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert m["teacher_path"] == weights and m["teacher_model"] == "deepseek-r1-distill-qwen-32b"
    assert m["teacher_fingerprint"].startswith("sha256:")
    assert (m["squad_source"], m["split"], m["mode"], m["chat"]) == (
        "train-v2.0.json", "train", "single", False)
    with open(os.path.join(cfg.out_dir, "README.md")) as f:
        card = f.read()
    assert "SQuAD-v2 train, `train` split of `train-v2.0.json`" in card
    assert "8 `after_think` (6 correct)" in card and "unfinished <think>: 2" in card
    # the written shard carries the answer source of every parseable output (trace schema 2)
    with gzip.open(os.path.join(cfg.out_dir, "traces-p00000.jsonl.gz"), "rt") as f:
        written = [json.loads(x) for x in f]
    assert sorted(x.get("answer_source", "") for x in written) == \
        [""] * 2 + ["after_think"] * 8 + ["tag"] * 3


def test_dry_run_builds_the_regift_traces_correct_config(paper_run, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from regift_jax.data import builders as B
    cfg = paper_run[0]
    b = B.RegiftTraces(config="correct", source=cfg.out_dir, data_dir=str(tmp_path / "tfds"))
    b.download_and_prepare(download_config=B.offline_download_config())
    rows = list(tfds.as_numpy(b.as_dataset(split="train")))
    assert len(rows) == 9 and all(r["lenient_correct"] for r in rows)
    assert b.info.metadata["read_report"]["dropped"] == {"unfinished <think>": 2}
