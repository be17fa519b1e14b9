"""Trace generation: resumable after SIGKILL, exactly-once records, manifest pinning."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, exported as an HF directory."""
    import jax
    from regift_jax.models.checkpoints import export_hf
    from regift_jax.models.config import ModelConfig
    from regift_jax.models.decoder import init_params
    from regift_jax.models.tokenizer import load_tokenizer, smollm2_gguf_path
    try:
        tok = load_tokenizer(smollm2_gguf_path())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params = init_params(cfg, jax.random.PRNGKey(1))
    d = tmp_path_factory.mktemp("tiny_teacher")
    export_hf(str(d), cfg, params, tokenizer=tok)
    return str(d)


def _cmd(teacher, out, n_q=12):
    return [sys.executable, "-m", "regift_jax.generate_traces",
            "--config=configs/teacher_smollm2.py:smoke", f"--config.teacher.model={teacher}",
            f"--config.out_dir={out}", f"--config.data.max_questions={n_q}",
            "--config.num_samples=2", "--config.batch_size=4",
            "--config.decode.max_reasoning_tokens=6", "--config.decode.max_answer_tokens=4",
            "--config.progress=False"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")


def _records(out):
    recs = []
    for fn in sorted(os.listdir(out)):
        if fn.startswith("traces-p") and fn.endswith(".jsonl.gz"):
            recs += [json.loads(ln) for ln in gzip.open(os.path.join(out, fn), "rt")]
        assert not (fn.startswith("traces-p") and fn.endswith(".jsonl")), fn  # compacted: gz
    parts = os.path.join(out, "parts")
    for fn in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        if fn.endswith(".jsonl"):
            recs += [json.loads(ln) for ln in open(os.path.join(parts, fn))]
    return recs


def test_sigkill_and_resume_exactly_once(tiny_teacher, tmp_path):
    out = str(tmp_path / "traces")
    p = subprocess.Popen(_cmd(tiny_teacher, out), cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = os.path.join(out, "parts")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.isdir(parts) and any(f.endswith(".jsonl") for f in os.listdir(parts)):
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    partial = _records(out)
    assert 0 < len(partial) < 24
    r = subprocess.run(_cmd(tiny_teacher, out), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = _records(out)
    keys = [(x["id"], x["sample_index"]) for x in recs]
    assert len(keys) == len(set(keys)) == 24  # 12 questions x 2 samples, no duplicate
    assert {s for _, s in keys} == {0, 1}
    assert not os.listdir(parts)  # compacted
    # every record reads back through the trace reader and its fields are consistent
    from regift_jax.data.records import parse_teacher_output, read_trace_jsonl
    got, report = read_trace_jsonl(os.path.join(out, "traces-p00000.jsonl.gz"))
    assert len(got) == 24 and report.n_dropped == 0, report.summary()
    for x in got:
        assert (x.reasoning, x.answer) == parse_teacher_output(x.raw_generation)[:2]
        assert x.raw_generation.startswith("<think> Let's think step by step")
        assert x.prompt_version == "teacher_extraction@v1+two_phase"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["records"] == 24
    assert os.path.exists(os.path.join(out, "summary.png"))


def test_resume_with_other_settings_is_refused(tiny_teacher, tmp_path):
    out = str(tmp_path / "traces")
    r = subprocess.run(_cmd(tiny_teacher, out, n_q=2), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = _cmd(tiny_teacher, out, n_q=2) + ["--config.decode.temperature=0.3"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "other settings" in (r.stdout + r.stderr) and "temperature" in (r.stdout + r.stderr)


def test_unit_seed_and_question_selection():
    from regift_jax.traces.generate import load_questions, unit_seed
    from configs.teacher_smollm2 import get_config
    assert unit_seed("a", 0) != unit_seed("a", 1) and unit_seed("a", 0) == unit_seed("a", 0)
    c = get_config()
    c.data.max_questions = 300
    qs = load_questions(c)
    assert len(qs) == 300 and len({q["id"] for q in qs}) == 300
    frac = sum(not q["is_impossible"] for q in qs) / len(qs)
    assert 0.7 < frac < 0.9  # about answerable_fraction=0.8
    assert load_questions(c) == qs  # deterministic


def test_compact_merges_a_plain_shard_and_parts_into_gzip(tmp_path):
    """Older runs compacted to plain ``.jsonl``: resuming reads it, compaction folds it and the
    new parts into one ``.jsonl.gz`` (no duplicate, nothing lost) and the reader reads it."""
    from regift_jax.traces import generate as G
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "parts"))
    rec = lambda q, s: json.dumps({"id": q, "sample_index": s}) + "\n"  # noqa: E731
    with open(os.path.join(out, "traces-p00000.jsonl"), "w") as f:
        f.write(rec("a", 0) + rec("a", 1))
    with open(os.path.join(out, "parts", "p00000-000001.jsonl"), "w") as f:
        f.write(rec("a", 1) + rec("b", 0))
    assert set(G._read_done(out, 0)) == {("a", 0), ("a", 1), ("b", 0)}
    G._compact(out, 0)
    assert sorted(os.listdir(out)) == ["parts", "traces-p00000.jsonl.gz"]
    assert not os.listdir(os.path.join(out, "parts"))
    lines = gzip.open(os.path.join(out, "traces-p00000.jsonl.gz"), "rt").read().splitlines()
    assert [(json.loads(x)["id"], json.loads(x)["sample_index"]) for x in lines] == [
        ("a", 0), ("a", 1), ("b", 0)]
    assert set(G._read_done(out, 0)) == {("a", 0), ("a", 1), ("b", 0)}
    first = open(os.path.join(out, "traces-p00000.jsonl.gz"), "rb").read()
    G._compact(out, 0)  # nothing new: untouched
    assert open(os.path.join(out, "traces-p00000.jsonl.gz"), "rb").read() == first
