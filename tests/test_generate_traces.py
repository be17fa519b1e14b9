"""Trace generation: resumable after SIGKILL, exactly-once records, manifest pinning."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import _smollm2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, exported as an HF directory."""
    return _smollm2.export_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="module")
def tiny_teacher_b(tiny_teacher, tmp_path_factory):
    """Another tiny teacher: the same architecture and tokenizer, other weights."""
    import jax
    from regift_jax.models.checkpoints import export_hf
    from regift_jax.models.decoder import init_params
    from regift_jax.models import load
    h = load(tiny_teacher)
    d = tmp_path_factory.mktemp("tiny_teacher_b")
    export_hf(str(d), h.cfg, init_params(h.cfg, jax.random.PRNGKey(2)), tokenizer=h.tokenizer)
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
    assert summary["units_configured"] == summary["units_written"] == 24
    assert os.path.exists(os.path.join(out, "summary.png"))


@pytest.fixture(scope="module")
def finished_run(tiny_teacher, tmp_path_factory):
    """A completed 2-question run (4 units) of the command line; tests work on copies."""
    out = str(tmp_path_factory.mktemp("finished") / "traces")
    r = subprocess.run(_cmd(tiny_teacher, out, n_q=2), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture()
def resumable(finished_run, tmp_path):
    out = str(tmp_path / "traces")
    shutil.copytree(finished_run, out)
    return out


def _cfg(teacher, out, n_q=2, **over):
    """The in-process config of ``_cmd``; ``over``: dotted keys (``decode__seed=1``)."""
    from regift_jax.core import configs_util
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "teacher_smollm2.py:smoke"))
    c.teacher.model, c.out_dir, c.data.max_questions = teacher, out, n_q
    c.num_samples, c.batch_size, c.progress = 2, 4, False
    c.decode.max_reasoning_tokens, c.decode.max_answer_tokens = 6, 4
    for key, value in over.items():
        *path, leaf = key.split("__")
        node = c
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def _unit_keys(out):
    return sorted((x["id"], x["sample_index"]) for x in _records(out))


def test_resume_with_other_settings_is_refused(tiny_teacher, resumable):
    out = resumable
    cmd = _cmd(tiny_teacher, out, n_q=2) + ["--config.decode.temperature=0.3"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "other settings" in (r.stdout + r.stderr) and "temperature" in (r.stdout + r.stderr)
    # one line per difference, no traceback
    assert "  decoding.temperature: 0.7 -> 0.3" in r.stderr and "Traceback" not in r.stderr


def test_the_manifest_pins_the_teacher_and_the_data(tiny_teacher, finished_run):
    """The manifest records the teacher's content fingerprint and derived label, the data
    selection (source file and its sha256, split, seed, counts) and the number of units; the
    summary counts progress against that number."""
    from regift_jax.models.fingerprint import describe_model
    m = _manifest(finished_run)
    ident = describe_model(tiny_teacher)
    assert m["teacher"] == ident.label == os.path.basename(tiny_teacher)
    assert m["teacher_fingerprint"] == ident.fingerprint
    assert m["squad_source"] == "dev-v2.0.reconstructed.json"
    assert m["squad_sha256"] == ("sha256:72fb06181d94ff531e9dcb9e0cbb277bffcdde84521eee6c4f6f9"
                                 "d80c722641a")
    assert (m["split"], m["data_seed"], m["max_questions"], m["answerable_fraction"],
            m["num_samples"], m["units_configured"], m["processes"], m["trace_schema"]) == (
        "pool", 0, 2, 0.8, 2, 4, 1, 2)
    assert {x["teacher"] for x in _records(finished_run)} == {ident.label}
    with open(os.path.join(finished_run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["units_configured"] == summary["units_written"] == 4
    assert summary["outcomes"]["lines"] == 4


def test_resume_with_another_teacher_is_refused(tiny_teacher, tiny_teacher_b, resumable,
                                                monkeypatch):
    """Issue 15: 540 of 600 units came from a second model labelled with the first one's name."""
    from regift_jax import models
    from regift_jax.traces import generate as G
    before = _unit_keys(resumable)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded a teacher"))
    with pytest.raises(G.TraceConfigError) as e:
        G.run(_cfg(tiny_teacher_b, resumable))
    msg = str(e.value)
    assert "teacher_fingerprint: 'sha256:" in msg and "resume_override=True" in msg
    assert f"teacher: {os.path.basename(tiny_teacher)!r} -> " \
        f"{os.path.basename(tiny_teacher_b)!r}" in msg
    assert _unit_keys(resumable) == before and "resume_overrides" not in _manifest(resumable)


def test_resume_with_a_changed_seed_or_count_is_refused(tiny_teacher, resumable):
    """Issue 15: a changed data seed mixed two question sets (units_configured 200, written
    800) without a warning."""
    from regift_jax.traces import generate as G
    with pytest.raises(G.TraceConfigError, match=r"data_seed: 0 -> 1") as e:
        G.run(_cfg(tiny_teacher, resumable, data__seed=1))
    assert "units_configured" not in str(e.value)  # the same count, other questions
    with pytest.raises(G.TraceConfigError, match=r"max_questions: 2 -> 3(.|\n)*"
                                                 r"units_configured: 4 -> 6"):
        G.run(_cfg(tiny_teacher, resumable, n_q=3))
    with pytest.raises(G.TraceConfigError, match=r"teacher_dtype: 'float32' -> 'bfloat16'"):
        G.run(_cfg(tiny_teacher, resumable, teacher__dtype="bfloat16"))


def test_resume_override_is_recorded(tiny_teacher, tiny_teacher_b, resumable):
    from regift_jax.traces import generate as G
    s = G.run(_cfg(tiny_teacher_b, resumable, resume_override=True))
    m = _manifest(resumable)
    assert m["teacher"] == os.path.basename(tiny_teacher_b)
    (entry,) = m["resume_overrides"]
    assert entry["differences"]["teacher"] == [os.path.basename(tiny_teacher),
                                               os.path.basename(tiny_teacher_b)]
    assert "teacher_fingerprint" in entry["differences"]
    assert s["resume_overrides"] == 1 and s["units_configured"] == s["units_written"] == 4
    with open(os.path.join(resumable, "README.md")) as f:
        assert "Resumed with overridden settings" in f.read()
    G.run(_cfg(tiny_teacher_b, resumable))  # the new identity resumes without the override
    assert len(_manifest(resumable)["resume_overrides"]) == 1


def test_an_older_manifest_is_refused_listing_what_it_did_not_record(tmp_path):
    """A manifest written before the identity keys existed cannot vouch for the teacher or the
    data: resuming it needs the override, which stores the differences as text."""
    from regift_jax.traces import generate as G
    old = {"teacher": "T", "prompt_version": "p", "decoding": {"seed": 0, "top_k": 0}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    new = {k: 1 for k in G.IDENTITY_KEYS}
    new.update(teacher="T", prompt_version="p", decoding={"seed": 0, "top_k": 5})
    with pytest.raises(G.TraceConfigError) as e:
        G.check_manifest(str(tmp_path), new)
    msg = str(e.value)
    assert "\n  decoding.top_k: 0 -> 5" in msg and "\n  teacher_fingerprint: (not recorded) -> 1" \
        in msg and "teacher:" not in msg and "prompt_version" not in msg
    got = G.check_manifest(str(tmp_path), new, override=True)
    stored = _manifest(str(tmp_path))
    assert got == stored and stored["resume_overrides"][0]["differences"]["data_seed"] == [
        "(not recorded)", 1]
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(G.TraceConfigError, match="not a readable manifest"):
        G.check_manifest(str(tmp_path), new)


def test_a_typed_teacher_name_must_name_the_model(tiny_teacher, tmp_path):
    from regift_jax.traces import generate as G
    c = _cfg(tiny_teacher, str(tmp_path), teacher__name="SmolLM2-135M-Instruct (Q4_1 GGUF)")
    with pytest.raises(G.TraceConfigError, match="does not name the model"):
        G.teacher_identity(c)
    c.teacher.name = f"{os.path.basename(tiny_teacher).upper()} (random weights)"
    assert G.teacher_identity(c).label == c.teacher.name


def test_a_bad_part_line_is_regenerated_and_the_job_finishes(tiny_teacher, resumable, caplog):
    """Issue 15: compaction raised JSONDecodeError on the line resume had skipped, every rerun."""
    from regift_jax.traces import generate as G
    final = os.path.join(resumable, "traces-p00000.jsonl.gz")
    lines = gzip.open(final, "rt").read().splitlines(keepends=True)
    os.remove(final)
    with open(os.path.join(resumable, "parts", "p00000-000001.jsonl"), "w") as f:
        f.write(lines[0] + '{"id": "broken' + "\n" + "".join(lines[2:]))
    with caplog.at_level("WARNING"):
        s = G.run(_cfg(tiny_teacher, resumable))
    assert "p00000-000001.jsonl:2" in caplog.text and "malformed_json: 1" in caplog.text
    keys = _unit_keys(resumable)
    assert len(keys) == len(set(keys)) == 4 and not os.listdir(os.path.join(resumable, "parts"))
    assert s["units_written"] == 4 and s["read_report"]["n_dropped"] == 0


def test_a_truncated_compacted_shard_is_a_counted_tail(tiny_teacher, resumable, caplog):
    """Issue 15: a truncated compacted ``.jsonl.gz`` crashed the restart with a bare EOFError."""
    from regift_jax.traces import generate as G
    final = os.path.join(resumable, "traces-p00000.jsonl.gz")
    data = open(final, "rb").read()
    with open(final, "wb") as f:
        f.write(data[:len(data) // 2])
    with caplog.at_level("WARNING"):
        s = G.run(_cfg(tiny_teacher, resumable))
    assert f"{final}:" in caplog.text and "truncated_tail: 1" in caplog.text
    keys = _unit_keys(resumable)
    assert len(keys) == len(set(keys)) == 4
    assert s["units_written"] == 4 and s["read_report"]["n_dropped"] == 0


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


def test_unreadable_lines_are_counted_and_their_units_regenerated(tmp_path, caplog):
    """A corrupt line in a part or a cut ``.jsonl.gz`` never stops a resume: the line is counted,
    its unit is not "done" (so it is generated again), and compaction leaves it out."""
    from regift_jax.traces import generate as G
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "parts"))
    rec = lambda q, s: json.dumps({"id": q, "sample_index": s}) + "\n"  # noqa: E731
    whole = gzip.compress((rec("a", 0) + rec("a", 1) * 2000).encode())
    with open(os.path.join(out, "traces-p00000.jsonl.gz"), "wb") as f:
        f.write(whole[:len(whole) // 2])  # cut short: ("a", 0) readable, the tail is not
    with open(os.path.join(out, "parts", "p00000-000001.jsonl"), "w") as f:
        f.write(rec("b", 0) + '{"id": "b", "sample_ind\n' + json.dumps({"id": "c"}) + "\n")
    with caplog.at_level("WARNING"):
        assert G._read_done(out, 0) == {("a", 0), ("a", 1), ("b", 0)}
    warned = caplog.text
    assert "generated again" in warned and "p00000-000001.jsonl:2" in warned
    for reason in ("truncated_tail: 1", "malformed_json: 1", "no_unit_key: 1"):
        assert reason in warned
    with open(os.path.join(out, "parts", "p00000-000002.jsonl"), "w") as f:
        f.write(rec("b", 1) + rec("c", 0))  # the regenerated units
    G._compact(out, 0)
    lines = gzip.open(os.path.join(out, "traces-p00000.jsonl.gz"), "rt").read().splitlines()
    keys = [(json.loads(x)["id"], json.loads(x)["sample_index"]) for x in lines]
    assert keys == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    assert not os.listdir(os.path.join(out, "parts"))


def test_load_questions_uses_the_one_split_rule():
    from configs.teacher_smollm2 import get_config
    from regift_jax.core.paths import default_source_dir
    from regift_jax.data import squad
    from regift_jax.traces.generate import load_questions
    rows = squad.read_squad_v2(squad.find_squad_file(default_source_dir("squad_v2")))
    got = {}
    for split in ("validation", "pool", "heldout"):
        c = get_config()
        c.data.update(dict(split=split, max_questions=0, answerable_fraction=-1.0))
        got[split] = load_questions(c)
        assert got[split] == squad.select_split(rows, split)
    assert len(got["pool"]) + len(got["heldout"]) == len(got["validation"]) == squad.DEV_QUESTIONS
    c = get_config()
    c.data.split = "test"
    with pytest.raises(ValueError, match="split 'test'; valid: validation, pool, heldout, train"):
        load_questions(c)
    c.data.split = "train"  # the vendored data has no train file
    with pytest.raises(FileNotFoundError, match=r"no train-v2\.0\.json"):
        load_questions(c)


def test_train_split_from_the_official_file_or_a_named_file():
    from configs.teacher_smollm2 import get_config
    from regift_jax.traces.generate import load_questions, squad_path
    train_dir = os.path.join(REPO, "tests", "fixtures", "squad_train")
    c = get_config()
    c.data.update(dict(squad_dir=train_dir, split="train", max_questions=0,
                       answerable_fraction=-1.0))
    assert squad_path(c) == os.path.join(train_dir, "train-v2.0.json")
    assert len(load_questions(c)) == 13
    c.data.update(dict(squad_dir="", squad_file=squad_path(c), split="heldout"))
    assert {q["title"] for q in load_questions(c)} == {"Loddon_Beekeepers"}


def _keys(cfg, prefix=""):
    out = set()
    for k, v in cfg.items():
        out |= _keys(v, prefix + k + ".") if hasattr(v, "items") else {prefix + k}
    return out


@pytest.mark.parametrize("spec", ["teacher_smollm2.py", "teacher_smollm2.py:smoke",
                                  "teacher_smollm2.py:gpu", "teacher_qwen2.py",
                                  "teacher_qwen2.py:r1_distill_qwen_7b"])
def test_teacher_configs_have_exactly_the_base_keys(spec):
    """Every teacher config is the shared base with values changed: no key missing (the
    generator reads each one directly) and none added."""
    from regift_jax.core import configs_util
    base = configs_util.load_module(os.path.join(REPO, "configs", "teacher_base.py")).base_config()
    cfg = configs_util.load_config_file(os.path.join(REPO, "configs", spec))
    assert _keys(cfg) == _keys(base)


def test_generation_does_not_import_tensorflow():
    """Trace generation runs where TensorFlow is not installed (e.g. an accelerator machine)."""
    code = ("import sys, regift_jax.generate_traces, regift_jax.data.squad, "
            "regift_jax.data.records; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
