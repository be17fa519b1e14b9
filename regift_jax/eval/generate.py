"""BBQ answers by generation: the shared sampler answers each item under one prompt condition.

:func:`generate_records` renders every item with a template (:mod:`regift_jax.core.prompts`:
``bbq_base`` zero-shot, ``bbq_reasoning`` think/answer tags, ``bbq_cot`` chain of thought,
``bbq_authors_released``), inside the tokenizer's chat template when asked (``chat``), with the
tokenizer's BOS as in training (:func:`regift_jax.core.prompts.encode_prompt`), and runs the one
:class:`regift_jax.models.sampling.Sampler` over all of them (greedy by default; batched and, with
``handle.mesh``, sharded over the data axes).  The returned text is the model's *whole* answer:
the template's prefill (e.g. ``"<think> Let's think step by step. \\n"``) followed by what was
generated (:func:`regift_jax.core.prompts.restore_prefill`), because the parsers need the opening
``<think>``; ``score_prefill=False`` returns the generation alone, as the authors' scripts did
(they sliced the whole prompt, prefill included, off the output).  Judging is not done here:
:func:`regift_jax.eval.bbq.judge_items` scores these texts exactly as it scores imported
``--generations`` files.

Token budget.  ``max_new_tokens`` (default :data:`DEFAULT_MAX_NEW_TOKENS`, enough for a
reasoning student to close ``<think>`` and answer) caps the generated tokens; ``max_total_tokens``
caps prompt + generated tokens per item (Hugging Face's ``max_length``, the authors' 2,048), so
each item's budget is ``max_total_tokens`` minus its own prompt.  The sampler runs to the largest
budget and each row is cut back to its own (exact: a row's tokens never depend on the other
rows); an answer that reaches its budget has ``finish_reason == "length"`` and is counted as cut
off in the report.  Before anything is generated, the longest prompt plus its budget is checked
against the model's position limit (``max_position_embeddings``): a run that cannot fit fails at
once with the item and the numbers, not half-way through.

Stop strings per template (:data:`TEMPLATE_STOPS`; ``stop_strings`` overrides them):

=====================  ===========================================================
template               stop strings
=====================  ===========================================================
bbq_base               none (EOS; the answer is the first sentence)
bbq_authors_released   none
bbq_reasoning          ``</answer>``
bbq_cot                ``answer is (A)``, ``answer is (B)``, ``answer is (C)``
=====================  ===========================================================

Prefix sharing.  Every prompt of a run starts with the same tokens (chat header, system turn,
instruction: ~55 of ~110 tokens for SmolLM2 and ``bbq_base``).  The longest common *token* prefix
of all tokenised prompts is passed to the sampler as ``prefix=`` (ids), prefilled once and copied
to every row; each prompt contributes only its remaining ids.  Because the split is made on the
token lists, the sequence the model sees is the same token sequence as without sharing (exact);
it is used only when it is at least ``min_shared_prefix`` tokens long.  Prefixes shared by smaller
groups (the BBQ items of one context) are not exploited here: the sampler takes one prefix per
call, and generation cost is dominated by decoding, not by the prompt.

One compiled decode program per run: the sampler gets a fixed ``cache_len`` (prefix + longest
prompt + the largest budget, each rounded to the sampler's length bucket).  ``shard=(start,
stop)`` generates only those items (one process's share, :mod:`regift_jax.eval.hosts`) with the
prefix, cache length, checks and row seeds of the whole list, so the shares of several processes
together are the single-process run.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from regift_jax.core import prompts as prompts_lib
from regift_jax.core.shapes import round_up
from regift_jax.eval.config import InputError
from regift_jax.eval.loglik import bbq_prompt, shared_prefix_length, use_chat
from regift_jax.models.sampling import SamplingConfig

#: Stop strings per template (the name without its version).
TEMPLATE_STOPS: Dict[str, tuple] = {
    "bbq_base": (),
    "bbq_authors_released": (),
    "bbq_reasoning": ("</answer>",),
    "bbq_cot": ("answer is (A)", "answer is (B)", "answer is (C)"),
}
#: New tokens when neither ``max_new_tokens`` nor ``max_total_tokens`` is given: the teacher's
#: trace budget, so a reasoning student is not cut off inside ``<think>``.
DEFAULT_MAX_NEW_TOKENS = 512


@dataclasses.dataclass
class GeneratedAnswer:
    """One item's generation: ``text`` = prefill + generated continuation (or the generation
    alone with ``score_prefill=False``)."""
    text: str
    prompt: str
    generated: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


def _name(template) -> str:
    name = template if isinstance(template, str) else template.name
    return name.split("@v", 1)[0]


def defaults_for(template) -> tuple:
    """``(max_new_tokens, stop strings)`` used when a run gives neither."""
    return DEFAULT_MAX_NEW_TOKENS, TEMPLATE_STOPS.get(_name(template), ())


def _where(item) -> str:
    return getattr(item, "source", "") or f"{item.category} example_id {item.example_id}"


def token_budgets(items, n_prompt: Sequence[int], max_new_tokens: Optional[int],
                  max_total_tokens: Optional[int], limit: Optional[int]) -> List[int]:
    """Each item's new-token budget; raises :class:`InputError` naming the item when a prompt
    leaves no room under ``max_total_tokens`` or prompt + budget exceeds the model's ``limit``
    (its ``max_position_embeddings``)."""
    if max_new_tokens is None and max_total_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    budgets = []
    for it, p in zip(items, n_prompt):
        b = max_new_tokens if max_total_tokens is None else max_total_tokens - p
        b = b if max_new_tokens is None else min(b, max_new_tokens)
        if b < 1:
            raise InputError(f"{_where(it)}: the prompt has {p} tokens, no room for an answer "
                             f"under max_total_tokens={max_total_tokens}")
        budgets.append(b)
    i = max(range(len(budgets)), key=lambda k: n_prompt[k] + budgets[k])
    need = n_prompt[i] + budgets[i]
    if limit and need > limit:
        raise InputError(
            f"{_where(items[i])}: prompt ({n_prompt[i]} tokens) + up to {budgets[i]} new tokens "
            f"= {need} positions, more than the model's limit of {limit} "
            f"(max_position_embeddings); lower generate.max_new_tokens or max_total_tokens")
    return budgets


def _cut_to_budget(g, budget: int, tok):
    """A sampler row cut back to ``budget`` tokens.  An EOS takes a slot of the budget, as in
    Hugging Face's ``max_length``; a row that needed more slots ends with ``"length"``."""
    used = g.generated_tokens + (g.finish_reason == "eos")
    if used <= budget:
        return g
    ids = list(g.token_ids[:budget])
    return dataclasses.replace(g, text=tok.decode(ids, skip_special_tokens=False),
                               token_ids=ids, finish_reason="length", generated_tokens=len(ids))


def _prompt_ids(tok, items, t, wrap: bool, system, share_prefix: bool,
                min_shared_prefix: int):
    """``(texts, prefix ids or None, own ids per item)``: the common token prefix split off.
    Ids follow the one BOS/chat rule (:func:`regift_jax.core.prompts.encode_prompt`)."""
    texts = [bbq_prompt(it, t, tok, chat=wrap, system=system, include_prefill=True)
             for it in items]
    bos = prompts_lib.bos_id(tok)
    ids = [prompts_lib.with_bos(tok(p, add_special_tokens=False)["input_ids"], bos)
           for p in texts]
    n_pre = shared_prefix_length(ids) if share_prefix and len(ids) > 1 else 0
    if n_pre < min_shared_prefix:
        return texts, None, ids
    return texts, ids[0][:n_pre], [x[n_pre:] for x in ids]


def generate_records(handle, items, template="bbq_base", *, chat="auto",
                     system: Optional[str] = None, max_new_tokens: Optional[int] = None,
                     max_total_tokens: Optional[int] = None,
                     stop_strings: Optional[Sequence[str]] = None, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 8,
                     length_bucket: int = 64, share_prefix: bool = True,
                     min_shared_prefix: int = 16, score_prefill: bool = True,
                     shard: Optional[Tuple[int, int]] = None,
                     progress=None) -> List[GeneratedAnswer]:
    """Generate an answer for every BBQ item (input order; ``shard``: for ``items[start:stop]``
    only); see the module docstring."""
    t = prompts_lib.get_template(template) if isinstance(template, str) else template
    tok = handle.tokenizer
    if tok is None:
        raise ValueError("generation needs a tokenizer (models.load(..., tokenizer=True))")
    if not items:
        return []
    stops = tuple(defaults_for(t)[1] if stop_strings is None else stop_strings)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    texts, prefix, own = _prompt_ids(tok, items, t, use_chat(tok, chat), system, share_prefix,
                                     min_shared_prefix)
    n_pre = len(prefix or ())
    limit = getattr(getattr(handle, "cfg", None), "max_position_embeddings", 0)
    budgets = token_budgets(items, [n_pre + len(x) for x in own], max_new_tokens,
                            max_total_tokens, limit)
    cache_len = (round_up(n_pre, length_bucket) + round_up(max(map(len, own)), length_bucket)
                 + round_up(max(budgets), length_bucket))
    a, b = shard or (0, len(items))
    if a >= b:
        return []
    sampler = handle.sampler(batch_size=batch_size, length_bucket=length_bucket,
                             cache_len=cache_len)
    sc = SamplingConfig(max_new_tokens=max(budgets[a:b]), temperature=float(temperature),
                        top_p=float(top_p), top_k=int(top_k), stop_strings=stops,
                        seed=int(seed))
    gens = sampler.generate(own[a:b], sc, row_seeds=list(range(a, b)), prefix=prefix,
                            progress=progress)
    gens = [_cut_to_budget(g, n, tok) for g, n in zip(gens, budgets[a:b])]
    return [GeneratedAnswer(text=prompts_lib.restore_prefill(t, g.text) if score_prefill
                            else g.text, prompt=p, generated=g.text,
                            finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                            generated_tokens=g.generated_tokens)
            for p, g in zip(texts[a:b], gens)]


def generate_answers(handle, items, template="bbq_base", **kw) -> List[str]:
    """The full answer text (prefill + generation) for every BBQ item, in input order."""
    return [g.text for g in generate_records(handle, items, template, **kw)]


def sampling_settings(template, max_new_tokens=None, stop_strings=None,
                      max_total_tokens=None) -> dict:
    """The effective token budget / stop strings (for reports)."""
    d_new, d_stop = defaults_for(template)
    if max_new_tokens is None and max_total_tokens is not None:
        d_new = None  # the total cap alone
    out = {"max_new_tokens": d_new if max_new_tokens is None else int(max_new_tokens),
           "stop_strings": list(d_stop if stop_strings is None else stop_strings)}
    if max_total_tokens is not None:
        out["max_total_tokens"] = int(max_total_tokens)
    return out
