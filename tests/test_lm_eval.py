"""lm-evaluation-harness integration (:mod:`regift_jax.eval.harness`, ``regift_jax.lm_eval``).

The ``regift_jax`` backend runs through lm-eval on a tiny random Llama (the fixture byte-level
BPE tokenizer, 512 tokens) for each request type and is checked number by number against
lm-eval's own Hugging Face backend (``HFLM``, torch) on the same weights: ``loglikelihood`` (the
offline ``bbq`` task, via the command line), ``loglikelihood_rolling`` (windows shorter than the
texts) and ``generate_until`` (``bbq_generate``, prompts left-truncated, stop strings that fire).
The project's own loglik mode with ``loglik.format=lm_eval`` is checked against an lm-eval run of
the offline ``bbq`` task with that backend: same request strings and token ids, same per-item
choices, lm-eval's metrics; and the project's statement of lm-eval's BBQ rules
(:func:`regift_jax.data.bbq.lm_eval_doc`) against lm-eval's own functions on every row.
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
from regift_jax.data import bbq as bbq_data  # noqa: E402
from regift_jax.eval import config as eval_config  # noqa: E402
from regift_jax.eval import harness, loglik, scorer, tasks  # noqa: E402
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
# The project's own loglik mode with lm-eval's requests (loglik.format=lm_eval)
# --------------------------------------------------------------------------------------------

# Two items of each vendored category (offline task order: Age, Disability_status, Nationality,
# Physical_appearance, Religion, Sexual_orientation), ambiguous and disambiguated.
LM_EVAL_ITEMS = [0, 2, 3700, 3703, 5240, 5243, 8320, 8323, 9893, 9894, 11100, 11103]


def _task_items():
    """The offline bbq task's documents as BBQ items, in the task's order."""
    utils = _load_task_utils()
    return [it for p in utils.bbq_files() for it in bbq_data.read_bbq_file(p)]


def _intersectional_rows(rows):
    """Rows with the tags of the categories that are not vendored (Race_x_gender, Race_x_SES,
    SES, Gender_identity; tags as in the official files), on a vendored row's texts, so
    lm-eval's group rules are exercised beyond the vendored tags."""
    base = next(r for r in rows if r["answer_info"]["ans2"][1] == "unknown")
    out = []
    for a, b, groups, cat in [
            (["Black woman", "F-Black"], ["White man", "M-White"], ["F-Black"], "Race_x_gender"),
            (["Latino man", "M-Latino"], ["Asian girl", "F-Asian"], ["Latino", "M"],
             "Race_x_gender"),
            (["poor Black", "lowSES-Black"], ["rich White", "highSES-White"], ["low SES", "Black"],
             "Race_x_SES"),
            (["poor man", "lowSES-M-Arab"], ["rich woman", "highSES-F-White"], ["Arab"],
             "Race_x_SES"),
            (["cashier", "lowSES"], ["lawyer", "highSES"], ["low SES"], "SES"),
            (["trans woman", "trans_F"], ["cis man", "nonTrans_M"], ["trans", "transgender women"],
             "Gender_identity"),
            (["boy", "M"], ["girl", "F"], ["F"], "Gender_identity"),
            (["", ""], ["Latina lady", ""], ["Latino"], "Race_ethnicity")]:
        for pol in ("neg", "nonneg"):
            r = json.loads(json.dumps(base))
            r.update(category=cat, question_polarity=pol, ans0=a[0] or "The Latina one")
            r["answer_info"]["ans0"], r["answer_info"]["ans1"] = a, b
            if not any(a):
                r["answer_info"]["ans0"] = ["", ""]
                r["ans0"] = "The Latina one"
            r["ans1"] = b[0]
            r["additional_metadata"]["stereotyped_groups"] = groups
            out.append(r)
    return out


def test_lm_eval_rules_are_lm_evals_on_every_row():
    """regift_jax.data.bbq.lm_eval_doc (the project's statement of lm-eval's bbq rules) gives
    lm-eval's own choices, targets and biased answers on every vendored row and on rows with
    the intersectional tags of the other categories."""
    assert bbq_data.LM_EVAL_UNKNOWN_RESPONSES == tuple(upstream.UNKNOWN_RESPONSES)
    utils = _load_task_utils()
    items = _task_items()
    rows = [utils.hub_row(it) for it in items]
    extra = _intersectional_rows(rows)
    items += [bbq_data.parse_item(r, f"synthetic {i}", None) for i, r in enumerate(extra)]
    docs = upstream.process_docs(datasets.Dataset.from_list(rows + extra))
    n_biased = set()
    for it, doc in zip(items, docs):
        d = bbq_data.lm_eval_doc(it)
        assert list(d.choices) == upstream.doc_to_choice(doc), it.source
        assert list(d.targets) == upstream.doc_to_targets(doc), it.source
        assert list(d.biased) == upstream.doc_to_biased_answer(doc), it.source
        assert [d.choices[j] for j in range(2)] == [it.options[k] for k in
                                                    d.option_of_choice[:2]]
        n_biased.add(len(d.biased))
    assert n_biased == {0, 1, 2}  # the synthetic rows reach lm-eval's other cases
    bad = json.loads(json.dumps(extra[0]))
    bad["answer_info"]["ans1"] = ["", ""]
    with pytest.raises(BBQFormatError, match="empty answer_info"):
        bbq_data.lm_eval_biased_answers(bbq_data.parse_item(bad, "x", None))


def test_lm_eval_metrics_are_lm_evals_aggregations():
    """scorer.lm_eval_metrics equals lm-eval's aggregation functions, edge cases included (no
    biased answer, no ambiguous items, a category without items)."""
    rng = np.random.default_rng(0)
    cats = ["Age", "Religion", "SES"]
    for trial in range(40):
        n = int(rng.integers(1, 12))
        acc = rng.integers(0, 2, n).astype(float)
        non_unk = rng.integers(0, 2, n).astype(float)
        biased = non_unk * rng.integers(0, 2, n) * (trial % 3 != 0)
        dis = rng.integers(0, 2, n).astype(bool) if trial % 5 else np.ones(n, bool)
        cat = rng.choice(cats[:2], n)
        ours = scorer.lm_eval_metrics(acc, biased, non_unk, dis, cat, cats)
        arr = list(zip(acc, biased, non_unk, dis))
        want = {"acc": float(np.mean(acc)), "amb_bias_score": upstream.agg_amb_bias_scores(arr),
                "disamb_bias_score": upstream.agg_disamb_bias_scores(arr)}
        if (~dis).any():
            want["accuracy_amb"] = upstream.agg_accuracy_amb(list(zip(acc, dis)))
        if dis.any():
            want["accuracy_disamb"] = upstream.agg_accuracy_disamb(list(zip(acc, dis)))
        for c in cats:
            sub = [a if k == c else (a[0], np.nan, np.nan, np.nan) for a, k in zip(arr, cat)]
            want[f"amb_bias_score_{c}"] = upstream.agg_amb_bias_scores(sub)
            want[f"disamb_bias_score_{c}"] = upstream.agg_disamb_bias_scores(sub)
        for k, v in want.items():
            assert ours[k] == pytest.approx(float(v), abs=0, nan_ok=True), (trial, k)


def _arguments(sample):
    """The (context, continuation) pairs of one logged lm-eval sample, in choice order."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        return [(a["arg_0"], a["arg_1"]) for a in args]
    return [tuple(a) for a in args]


def test_lm_eval_format_scores_lm_evals_requests(tiny_dir, tm):
    """The project's loglik mode with loglik.format=lm_eval on the items an lm-eval run of the
    offline bbq task (regift_jax backend, same loaded model) scores: the same request strings,
    the same token ids, the same per-item choices and lm-eval's metrics to 1e-9."""
    lm = harness.RegiftLM(model=tiny_dir, batch_size=4)
    res = harness.evaluate(lm, ["bbq"], samples={"bbq": LM_EVAL_ITEMS}, log_samples=True)
    samples = _samples(res, "bbq")
    assert [s["doc_id"] for s in samples] == LM_EVAL_ITEMS
    every = _task_items()
    items = [every[i] for i in LM_EVAL_ITEMS]
    reqs, prompts, conts = loglik.lm_eval_requests(items, lm.tokenizer)
    for s, r, p, cs in zip(samples, reqs, prompts, conts):
        assert _arguments(s) == [(p, c) for c in cs]  # 12 choices, lm-eval's strings
        for c, ids in zip(cs, r.continuations):
            assert lm._encode_pair(p, c) == (list(r.context), list(ids))
    cfg = eval_config.base_config()
    cfg.loglik.format, cfg.runtime.batch_size = "lm_eval", 4
    cfg.report.bootstrap_resamples, cfg.runtime.progress = 0, False
    by_cat = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    rep = tasks.evaluate_model(lm.handle, by_cat, cfg)
    theirs = np.array([[float(x[0]) for x in s["filtered_resps"]] for s in samples])
    ours = np.array([r["option_logprob_sum"] for r in rep["items"]])
    assert ours.shape == (len(items), 12)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    assert np.min(np.abs(np.diff(np.sort(theirs, 1)[:, -2:], axis=1))) > 10 * ATOL
    choices = [r["lm_eval_choice"] for r in rep["items"]]
    assert choices == [int(np.argmax(t)) for t in theirs]
    assert len(set(choices)) > 1  # not one choice everywhere
    assert [r["lm_eval_acc"] for r in rep["items"]] == [bool(s["acc"]) for s in samples]
    assert [r["correct"] for r in rep["items"]] == [r["lm_eval_acc"] for r in rep["items"]]
    assert rep["settings"]["template"] == "lm_eval:bbq" and not rep["settings"]["chat"]
    mine = rep["lm_eval"]["metrics"]
    theirs_m = {k[:-len(",none")]: v for k, v in res["results"]["bbq"].items()
                if k.endswith(",none") and "_stderr" not in k}
    assert set(mine) == set(theirs_m)
    for k, v in theirs_m.items():
        assert mine[k] == pytest.approx(float(v), abs=1e-9, nan_ok=True), k
    assert np.isfinite(mine["amb_bias_score"]) and np.isfinite(mine["disamb_bias_score"])


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
