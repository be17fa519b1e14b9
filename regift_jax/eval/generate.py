"""BBQ answers by generation: the shared sampler answers each item under one prompt condition.

:func:`generate_records` renders every item with a template (:mod:`regift_jax.core.prompts`:
``bbq_base`` zero-shot, ``bbq_reasoning`` think/answer tags, ``bbq_cot`` chain of thought,
``bbq_authors_released``), optionally inside the tokenizer's chat template, and runs the one
:class:`regift_jax.models.sampling.Sampler` over all of them (greedy by default; batched and, with
``handle.mesh``, sharded over the data axes).  The returned text is the model's *whole* answer:
the template's prefill (e.g. ``"<think> Let's think step by step. \\n"``) followed by what was
generated (:func:`regift_jax.core.prompts.restore_prefill`), because the parsers need the opening
``<think>``.  Judging is not done here: :func:`regift_jax.eval.evaluate.judge_items` scores these texts
exactly as it scores imported ``--generations`` files.

Per-template defaults (:data:`TEMPLATE_DEFAULTS`; every value can be overridden):

=====================  ==============  ===========================================================
template               max_new_tokens  stop strings
=====================  ==============  ===========================================================
bbq_base               64              none (EOS; the answer is the first sentence)
bbq_authors_released   64              none
bbq_reasoning          512             ``</answer>``
bbq_cot                512             ``answer is (A)``, ``answer is (B)``, ``answer is (C)``
=====================  ==============  ===========================================================

Prefix sharing.  Every prompt of a run starts with the same tokens (chat header, system turn,
instruction: ~55 of ~110 tokens for SmolLM2 and ``bbq_base``).  The longest common *token* prefix
of all tokenised prompts is passed to the sampler as ``prefix=`` (ids), prefilled once and copied
to every row; each prompt contributes only its remaining ids.  Because the split is made on the
token lists, the sequence the model sees is the same token sequence as without sharing (exact);
it is used only when it is at least ``min_shared_prefix`` tokens long.  Prefixes shared by smaller
groups (the BBQ items of one context) are not exploited here: the sampler takes one prefix per
call, and generation cost is dominated by decoding, not by the prompt.

One compiled decode program per run: the sampler gets a fixed ``cache_len`` (prefix + longest
prompt + ``max_new_tokens``, each rounded to the sampler's length bucket).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

from regift_jax.core import prompts as prompts_lib
from regift_jax.eval.loglik import bbq_prompt, shared_prefix_length, use_chat

#: Per-template generation defaults: (max_new_tokens, stop strings).
TEMPLATE_DEFAULTS: Dict[str, tuple] = {
    "bbq_base": (64, ()),
    "bbq_authors_released": (64, ()),
    "bbq_reasoning": (512, ("</answer>",)),
    "bbq_cot": (512, ("answer is (A)", "answer is (B)", "answer is (C)")),
}
FALLBACK_DEFAULTS = (256, ())


@dataclasses.dataclass
class GeneratedAnswer:
    """One item's generation: ``text`` = prefill + generated continuation."""
    text: str
    prompt: str
    generated: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


def defaults_for(template) -> tuple:
    name = template if isinstance(template, str) else template.name
    name = name.split("@v", 1)[0]
    return TEMPLATE_DEFAULTS.get(name, FALLBACK_DEFAULTS)


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def generate_records(handle, items, template="bbq_base", *, chat="auto",
                     system: Optional[str] = None, max_new_tokens: Optional[int] = None,
                     stop_strings: Optional[Sequence[str]] = None, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 8,
                     length_bucket: int = 64, share_prefix: bool = True,
                     min_shared_prefix: int = 16, progress=None) -> List[GeneratedAnswer]:
    """Generate an answer for every BBQ item (input order); see the module docstring."""
    from regift_jax.models.sampling import SamplingConfig
    t = prompts_lib.get_template(template) if isinstance(template, str) else template
    tok = handle.tokenizer
    if tok is None:
        raise ValueError("generation needs a tokenizer (models.load(..., tokenizer=True))")
    if not items:
        return []
    d_new, d_stop = defaults_for(t)
    max_new = d_new if max_new_tokens is None else int(max_new_tokens)
    stops = tuple(d_stop if stop_strings is None else stop_strings)
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    wrap = use_chat(tok, chat)
    texts = [bbq_prompt(it, t, tok, chat=wrap, system=system, include_prefill=True)
             for it in items]
    ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in texts]
    n_pre = shared_prefix_length(ids) if share_prefix and len(ids) > 1 else 0
    prefix = ids[0][:n_pre] if n_pre >= min_shared_prefix else None
    if prefix is None:
        n_pre = 0
    own = [x[n_pre:] for x in ids]
    cache_len = (_round_up(n_pre, length_bucket) + _round_up(max(map(len, own)), length_bucket)
                 + _round_up(max_new, length_bucket))
    sampler = handle.sampler(batch_size=batch_size, length_bucket=length_bucket,
                             cache_len=cache_len)
    sc = SamplingConfig(max_new_tokens=max_new, temperature=float(temperature),
                        top_p=float(top_p), top_k=int(top_k), stop_strings=stops,
                        seed=int(seed))
    gens = sampler.generate(own, sc, row_seeds=list(range(len(own))), prefix=prefix,
                            progress=progress)
    return [GeneratedAnswer(text=prompts_lib.restore_prefill(t, g.text), prompt=p,
                            generated=g.text, finish_reason=g.finish_reason,
                            prompt_tokens=g.prompt_tokens, generated_tokens=g.generated_tokens)
            for p, g in zip(texts, gens)]


def generate_answers(handle, items, template="bbq_base", **kw) -> List[str]:
    """The full answer text (prefill + generation) for every BBQ item, in input order."""
    return [g.text for g in generate_records(handle, items, template, **kw)]


def sampling_settings(template, max_new_tokens=None, stop_strings=None) -> dict:
    """The effective max_new_tokens / stop strings (for reports)."""
    d_new, d_stop = defaults_for(template)
    return {"max_new_tokens": d_new if max_new_tokens is None else int(max_new_tokens),
            "stop_strings": list(d_stop if stop_strings is None else stop_strings)}
