"""lm-evaluation-harness integration (:mod:`regift_jax.eval.harness`, ``regift_jax.lm_eval``).

The ``regift_jax`` backend runs through lm-eval on a tiny random Llama (the fixture byte-level
BPE tokenizer, 512 tokens) for each request type and is checked number by number against
lm-eval's own Hugging Face backend (``HFLM``, torch) on the same weights: ``loglikelihood`` (the
offline ``bbq`` task, via the command line), ``loglikelihood_rolling`` (windows shorter than the
texts) and ``generate_until`` (``bbq_generate``, prompts left-truncated, stop strings that fire).
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

lm_eval = pytest.importorskip("lm_eval")  # the lm_eval / test extra
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm_eval.tasks.bbq.utils as upstream  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from regift_jax import lm_eval as cli  # noqa: E402
from regift_jax.core.paths import default_source_dir  # noqa: E402
from regift_jax.eval import harness  # noqa: E402
from regift_jax.data.bbq import BBQFormatError  # noqa: E402
from regift_jax.models.tokenizer import load_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_TOKENIZER = os.path.join(REPO, "tests", "fixtures", "train", "tokenizer")
# Items of four strata and two categories (indices into the offline task's docs).
ITEMS = [0, 1, 2, 3, 11000, 11001]
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random Llama (vocabulary 512, no BOS, EOS = pad = 0) with the fixture
    tokenizer, saved as a Hugging Face directory both backends load."""
    d = str(tmp_path_factory.mktemp("tiny_lm_eval"))
    c = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
                                 pad_token_id=0)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.save_pretrained(d)
    load_tokenizer(FIXTURE_TOKENIZER).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tm():
    return harness.task_manager()


def _hf(d, **kw):
    return HFLM(pretrained=d, device="cpu", dtype="float32", batch_size=4, **kw)


def _samples(res, task):
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _load_task_utils():
    path = os.path.join(harness.TASKS_DIR, "bbq", "utils.py")
    spec = importlib.util.spec_from_file_location("regift_bbq_task_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# The offline task
# --------------------------------------------------------------------------------------------

def test_offline_bbq_is_lm_evals_task_on_the_vendored_files(tm):
    def strip(cfg):  # function references by name only (their files differ)
        out = {}
        for k, v in cfg.items():
            if k in ("dataset_path", "dataset_name", "custom_dataset", "tag"):
                continue
            out[k] = json.loads(json.dumps(v, default=str).replace(
                os.path.join(harness.TASKS_DIR, "bbq", ""), "").replace(
                os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "bbq", ""), ""))
        return out
    builtin = TaskManager()
    for name in ("bbq", "bbq_ambig", "bbq_disambig", "bbq_generate", "bbq_generate_ambig",
                 "bbq_generate_disambig"):
        ours, theirs = tm.task_index[name], builtin.task_index[name]
        assert ours.yaml_path.is_relative_to(harness.TASKS_DIR)
        assert strip(ours.cfg) == strip(theirs.cfg), name
    assert builtin.task_index["bbq"].cfg["dataset_path"] == "oskarvanderwal/bbq"
    utils = _load_task_utils()
    for fn in ("doc_to_choice", "doc_to_target", "agg_amb_bias_scores",
               "process_results_multiple_choice", "process_results_generate_until"):
        assert getattr(utils, fn) is getattr(upstream, fn)
    for fn in ("process_docs", "process_docs_ambig", "process_docs_disambig"):
        assert getattr(utils, fn).__wrapped__ is getattr(upstream, fn)  # computed once
    # Every official row, unchanged, in category then line order; lm-eval's derived fields.
    docs = tm.load(["bbq"])["tasks"]["bbq"].test_docs()
    bbq_dir = default_source_dir("bbq")
    files = sorted(glob.glob(os.path.join(bbq_dir, "*.jsonl")))
    rows = [json.loads(line) for f in files for line in open(f, encoding="utf-8")]
    assert len(docs) == len(rows) == 11956
    for i in (0, 1, 5000, len(rows) - 1):
        doc = docs[i]
        assert {k: doc[k] for k in rows[i]} == rows[i]
        assert doc["biased_answers"] == upstream.process_docs(
            datasets.Dataset.from_list([rows[i]]))[0]["biased_answers"]
    assert docs[0]["biased_answers"] == ["The grandfather"]


def test_offline_bbq_bad_rows_name_file_and_line(tmp_path):
    utils = _load_task_utils()
    src = os.path.join(default_source_dir("bbq"), "Religion.jsonl")
    lines = open(src, encoding="utf-8").read().splitlines()[:3]
    bad = json.loads(lines[1])
    unknown = [k for k in ("ans0", "ans1", "ans2") if bad["answer_info"][k][1] == "unknown"][0]
    bad[unknown] = "No idea"  # not one of lm-eval's unknown phrasings
    (tmp_path / "Religion.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(BBQFormatError, match=r"Religion.jsonl:2: .*unknown phrasings"):
        utils.load_bbq(str(tmp_path))
    (tmp_path / "Religion.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(BBQFormatError,
                       match=r"Religion.jsonl:2: "):
        utils.load_bbq(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Age.jsonl"):
        utils.load_bbq(str(tmp_path), categories="Age")
    assert len(utils.load_bbq(bbq_dir=None, categories="Religion")["test"]) == 1200


# --------------------------------------------------------------------------------------------
# The three request types against lm-eval's HF backend
# --------------------------------------------------------------------------------------------

def test_loglikelihood_cli_matches_hf_backend(tiny_dir, tm, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["--model_args", f"model={tiny_dir}", "--tasks", "bbq",
                   "--samples", json.dumps({"bbq": ITEMS}), "--log_samples",
                   "--output_path", str(out)])
    assert rc == 0
    [res_file] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    [smp_file] = glob.glob(str(out / "**" / "samples_bbq_*.jsonl"), recursive=True)
    ours = json.loads(open(res_file).read())
    assert ours["config"]["model"] == harness.MODEL_NAME
    ours_samples = sorted((json.loads(x) for x in open(smp_file)), key=lambda s: s["doc_id"])
    hf = lm_eval.simple_evaluate(model=_hf(tiny_dir), tasks=["bbq"], task_manager=tm,
                                 samples={"bbq": ITEMS}, log_samples=True)
    hf_samples = _samples(hf, "bbq")
    assert [s["doc_id"] for s in ours_samples] == [s["doc_id"] for s in hf_samples] == ITEMS
    a = np.array([[float(r[0]) for r in s["filtered_resps"]] for s in ours_samples])
    b = np.array([[float(r[0]) for r in s["filtered_resps"]] for s in hf_samples])
    assert a.shape == (len(ITEMS), 12)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert ([[r[1] in (True, "True") for r in s["filtered_resps"]] for s in ours_samples]
            == [[bool(r[1]) for r in s["filtered_resps"]] for s in hf_samples])
    assert np.min(np.abs(np.diff(np.sort(b, 1)[:, -2:], axis=1))) > 10 * ATOL  # no near ties
    for m in ("acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score", "disamb_bias_score"):
        assert ours["results"]["bbq"][f"{m},none"] == pytest.approx(
            float(hf["results"]["bbq"][f"{m},none"]), abs=1e-9, nan_ok=True), m


def _rolling_task(path):
    return {"task": "tiny_rolling", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}"}


def test_loglikelihood_rolling_matches_hf_backend(tiny_dir, tmp_path):
    texts = ["I saw a grandson and their grandfather last week outside the Walmart.",
             "Hi", "A much longer text, several windows long. " * 6, "x"]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    max_length = 24  # windows of 24 tokens: every text but the short ones rolls
    ours = harness.RegiftLM(model=tiny_dir, batch_size=4, max_length=max_length)
    assert len(ours.tok_encode(texts[2])) > 3 * max_length
    kw = dict(tasks=[_rolling_task(data)], log_samples=True)
    r_ours = lm_eval.simple_evaluate(model=ours, **kw)
    r_hf = lm_eval.simple_evaluate(model=_hf(tiny_dir, max_length=max_length), **kw)
    a = [s["filtered_resps"][0] for s in _samples(r_ours, "tiny_rolling")]
    b = [s["filtered_resps"][0] for s in _samples(r_hf, "tiny_rolling")]
    a = np.array([float(x[0] if isinstance(x, (list, tuple)) else x) for x in a])
    b = np.array([float(x[0] if isinstance(x, (list, tuple)) else x) for x in b])
    assert len(a) == len(texts) and np.all(b < 0)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-6)
    for m in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert r_ours["results"]["tiny_rolling"][m] == pytest.approx(
            r_hf["results"]["tiny_rolling"][m], rel=1e-5)


def test_generate_until_matches_hf_backend(tiny_dir, tm):
    # Prompts longer than max_length - max_gen_toks are left-truncated (as HFLM does); "e" is a
    # stop string that fires in some generations and not in others.
    gen = {"max_gen_toks": 12, "until": ["\n\n", "e"]}
    kw = dict(tasks=["bbq_generate"], samples={"bbq_generate": ITEMS[:4]},
              log_samples=True, gen_kwargs=gen)
    ours = harness.RegiftLM(pretrained=tiny_dir, batch_size=4, max_length=64)
    r_ours = harness.evaluate(ours, **kw)  # the Python call
    r_hf = lm_eval.simple_evaluate(model=_hf(tiny_dir, max_length=64), task_manager=tm, **kw)
    a = [s["resps"][0][0] for s in _samples(r_ours, "bbq_generate")]
    b = [s["resps"][0][0] for s in _samples(r_hf, "bbq_generate")]
    assert len(a) == 4 and a == b
    assert all("e" not in t for t in a)
    assert any(len(ours.tok_encode(t)) < gen["max_gen_toks"] - 1 for t in a)  # cut early
    prompt = _samples(r_ours, "bbq_generate")[0]["arguments"][0][0]
    assert len(ours.tok_encode(prompt)) > 64 - gen["max_gen_toks"]  # truncated
    assert (r_ours["results"]["bbq_generate"]["acc,none"]
            == r_hf["results"]["bbq_generate"]["acc,none"])


# --------------------------------------------------------------------------------------------
# Model resolution, the command line, several devices
# --------------------------------------------------------------------------------------------

def test_resolve_model_training_workdir(tmp_path, tiny_dir):
    assert harness.resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert harness.resolve_model(tiny_dir) == tiny_dir  # a Hugging Face directory
    wd = tmp_path / "run"
    (wd / "export").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"run: a training work directory without an "
                                         r"exported model.*export.enabled=True"):
        harness.resolve_model(str(wd))
    (wd / "export" / "config.json").write_text("{}")
    assert harness.resolve_model(str(wd)) == str(wd / "export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    (wd / "result.json").write_text(json.dumps({"export_dir": str(elsewhere)}))
    assert harness.resolve_model(str(wd)) == str(elsewhere)
    (wd / "result.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"result.json: unreadable training result"):
        harness.resolve_model(str(wd))


def test_cli_defaults_and_errors(capsys):
    args = cli.parse_args(["--tasks", "bbq", "--include_path", "/x"])
    assert args.model == "regift_jax" and args.batch_size == "8"
    assert args.include_path == [harness.TASKS_DIR, "/x"]
    args = cli.parse_args(["--model", "hf", "--tasks", "bbq"])
    assert args.model == "hf" and not hasattr(args, "batch_size")
    assert cli.main(["--model_args", "model=x"]) == 2
    assert "--tasks is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method must be one of"):
        harness.RegiftLM(model="unused", method="fast")


_SHARDED = r"""
import json, sys
from lm_eval.api.instance import Instance
from regift_jax.eval import harness
lm = harness.RegiftLM(model=sys.argv[1], batch_size=3)
assert lm.handle.mesh is not None and lm.handle.mesh.shape["data"] == 2, lm.handle.mesh
assert lm.engine.batch_rows == 4 and lm.engine.max_group == 1
reqs = [Instance("loglikelihood", {}, tuple(a), i) for i, a in enumerate(json.loads(sys.argv[2]))]
print("RESULT" + json.dumps(lm.loglikelihood(reqs, disable_tqdm=True)))
"""


def test_sharded_over_two_devices_matches_hf_backend(tiny_dir):
    pairs = [["The grandson was struggling with the app.", " The grandfather"],
             ["The grandson was struggling with the app.", " Unknown"],
             ["Who was not comfortable using the phone?", " Can't be determined"],
             ["", "Hello there"], ["Q: who?\nA:", " The man"]]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", _SHARDED, tiny_dir, json.dumps(pairs)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    ours = json.loads(line[len("RESULT"):])
    hf = _hf(tiny_dir).loglikelihood(
        [Instance("loglikelihood", {}, tuple(p), i) for i, p in enumerate(pairs)],
        disable_tqdm=True)
    np.testing.assert_allclose([x[0] for x in ours], [x[0] for x in hf], atol=ATOL, rtol=0)
    assert [x[1] for x in ours] == [x[1] for x in hf]
