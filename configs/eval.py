"""Evaluation presets (big_vision style) on top of :func:`regift_jax.eval.config.base_config`.

    python -m regift_jax.evaluate --config=configs/eval.py:generate --model=DIR --out=DIR
    python -m regift_jax.evaluate --config=configs/eval.py:paper_eval --model=DIR --out=DIR
    python -m regift_jax.evaluate --config=configs/eval.py:cot --model=DIR --out=DIR \\
        --config.data.max_items_per_category=50 --config.generate.max_new_tokens=256

Presets (``get_config("name")`` or ``"preset=name"``; the flags and ``--config.KEY=VALUE`` still
override every value).  Each generation preset sets its own token budget, large enough for a
reasoning student to close its ``<think>`` and answer; the report counts the generations the
budget cut off.

* ``loglik`` (default): BBQ multiple choice by summed option log-likelihood, ``bbq_base`` prompt
  (the base config itself);
* ``generate``: the sampler answers with the ``bbq_reasoning`` prompt (think/answer tags,
  greedy, 512 new tokens, stop at ``</answer>``), judged by both parsers;
* ``cot``: chain of thought, ``bbq_cot`` prompt, 512 new tokens; the final "answer is (X)"
  decides;
* ``paper_eval``: the authors' BBQ generation run (``scripts/generate_bbq_outputs.py`` and their
  released generations): the released prompt (``bbq_authors_released``), raw (no chat
  template), greedy, up to 2,048 tokens of prompt + generation per item, no stop string (EOS
  ends), and only the generated text judged (the authors sliced the prompt off the output);
* ``lm_eval``: log-likelihood BBQ scored exactly as lm-eval's ``bbq`` task (its prompt, its 12
  choices with HELM's unknown phrasings, raw), with lm-eval's metrics beside the project's;
* ``stereoset``: StereoSet LM / SS / ICAT from per-token mean sentence log-likelihoods.
"""

from regift_jax.core import configs_util
from regift_jax.eval import config as eval_config

PRESETS = ("loglik", "generate", "cot", "paper_eval", "lm_eval", "stereoset")
#: New tokens of the generate and cot presets: the teacher's budget for a trace (512).
GENERATE_MAX_NEW_TOKENS = 512
#: The authors' generation length: prompt + generated tokens per item.
PAPER_MAX_TOTAL_TOKENS = 2048


def get_config(arg=None):
    a = configs_util.parse_arg(arg, preset="loglik")
    c = eval_config.base_config()
    c.preset = a.preset
    if a.preset == "loglik":
        c.mode = "loglik"
        c.prompt.template = "bbq_base"
    elif a.preset in ("generate", "cot"):
        c.mode = "generate"
        c.prompt.template = "bbq_reasoning" if a.preset == "generate" else "bbq_cot"
        c.generate.max_new_tokens = GENERATE_MAX_NEW_TOKENS
    elif a.preset == "paper_eval":
        c.mode = "generate"
        c.prompt.template = "bbq_authors_released"
        c.prompt.chat = "off"
        c.generate.temperature = 0.0
        c.generate.max_total_tokens = PAPER_MAX_TOTAL_TOKENS
        c.generate.stop = ()
        c.generate.score_prefill = False
    elif a.preset == "lm_eval":
        c.mode = "loglik"
        c.loglik.format = "lm_eval"
        c.prompt.chat = "off"
    elif a.preset == "stereoset":
        c.mode = "stereoset"
    else:
        raise ValueError(f"configs/eval.py: unknown preset {a.preset!r}; valid: "
                         f"{', '.join(PRESETS)}")
    return c
