"""The "Instruction" baseline: supervised fine-tuning on SQuAD-v2 gold answers, no traces.

    python -m regift_jax.train --config=configs/instruction.py --workdir=/tmp/inst
    python -m regift_jax.train --config=configs/instruction.py:llama3_1_8b --workdir=...

The argument names a student preset of ``configs/llama.py``, ``configs/mistral.py`` or
``configs/phi4.py`` (default ``smollm2_135m``); everything (model, LoRA, optimizer, batch,
length, mesh) is that preset's, only the data changes:

* ``data.kind = "squad_gold"``: the SQuAD-v2 ``pool`` split (the questions the teacher traces are
  generated from; the article-hash split of ``regift_jax.data.squad.select_split``), each
  question's first gold answer, ``Not in background.`` for unanswerable ones;
* ``data.template = "instruction_baseline"``: the student prompt of ``student_train`` unchanged,
  target ``<answer> A </answer>`` (``regift_jax.core.prompts``), so both arms are evaluated with one
  prompt and one parser.

The held-out evaluation loss uses ``data.eval_fraction`` of the pool by question id, as for traces.
"""

from regift_jax.core import configs_util

STUDENTS = {
    "smollm2_135m": "llama", "llama3_1_8b": "llama", "llama3_1_8b_full": "llama",
    "mistral_7b": "mistral", "mistral_7b_full": "mistral", "phi4": "phi4", "phi4_full": "phi4",
}


def get_config(arg=None):
    a = configs_util.parse_arg(arg, student="smollm2_135m")
    if a.student not in STUDENTS:
        raise ValueError(f"configs/instruction.py: unknown student preset {a.student!r}; valid: "
                         f"{', '.join(STUDENTS)}")
    c = configs_util.sibling_config(__file__, STUDENTS[a.student]).get_config(a.student)
    c.preset = f"instruction:{a.student}"
    c.data.kind = "squad_gold"
    c.data.source = ""  # the data root's squad_v2/ (vendored data/squad_v2 in a checkout)
    c.data.squad_split = "pool"
    c.data.template = "instruction_baseline"
    c.data.overlong = "drop"  # no reasoning span to truncate
    return c
