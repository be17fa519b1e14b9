"""Evaluation configuration: the ``ml_collections`` base config that holds every evaluation option,
and the command line that fills it.

:func:`base_config` documents every key with its default; presets live in ``configs/eval.py``
(``loglik``, ``generate``, ``cot``, ``paper_eval``, ``stereoset``) and change values, never add keys.  The
command line (:func:`from_argv`, used by ``python -m regift_jax.evaluate``)::

    python -m regift_jax.evaluate --model=DIR --mode=generate --out=DIR
    python -m regift_jax.evaluate --config=configs/eval.py:generate --model=DIR --out=DIR \\
        --config.generate.temperature=0.7 --config.data.max_items=40

* ``--config=FILE[:ARG]`` loads a config file's ``get_config(ARG)``
  (:func:`regift_jax.core.configs_util.load_config_file`); without it the base config is used;
* every flag of :data:`FLAGS` (``--model``, ``--mode``, ``--prompt``, ``--categories``,
  ``--max_items``, ...) is an alias of one config key;
* ``--config.KEY=VALUE`` (``--config.KEY VALUE``; ``--noconfig.KEY`` for a boolean false) sets
  any key, after the flag aliases.  An unknown key fails with the list of valid keys
  (:func:`regift_jax.core.configs_util.check_key`), a value that does not fit the key's type
  names the key.

Sections: ``data`` (BBQ / StereoSet files, categories, the item subset), ``prompt`` (template,
chat wrapping), ``generate`` (sampling, token budget), ``loglik`` (scoring method), ``judge``
(answer parsing), ``report`` (bootstrap, comparison, title), ``runtime`` (batch, dtype, mesh,
progress bar), ``distributed`` (several processes).

This module imports no JAX: the command line reads ``xla_cpu_flags`` from the config before JAX
starts.
"""

from __future__ import annotations

import argparse
import ast
from typing import List, Optional, Sequence, Tuple

import ml_collections
from ml_collections import config_dict

from regift_jax.core import configs_util

MODEL_MODES = ("loglik", "generate", "stereoset")
LOGLIK_METHODS = ("prefix", "packed", "unpacked")
#: What the loglik mode scores: the prompt template's prompt with the three options, or exactly
#: lm-eval's ``bbq`` requests (its prompt and 12 choices; see
#: :func:`regift_jax.eval.loglik.lm_eval_requests`).
LOGLIK_FORMATS = ("template", "lm_eval")
#: The valid values of the enumerated keys.
CHOICES = {"mode": MODEL_MODES, "prompt.chat": ("auto", "on", "off"),
           "judge.tie_break": ("first", "unparseable"), "loglik.method": LOGLIK_METHODS,
           "loglik.format": LOGLIK_FORMATS,
           "distributed.initialize": ("auto", "always", "never")}


class InputError(ValueError):
    """Bad evaluation input (config, flags or files); the message names the file (and line)."""


def _section(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def base_config() -> ml_collections.ConfigDict:
    """Every evaluation option with its default (locked: presets change values, add no keys)."""
    none = config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.preset = ""  # informational: which preset built this config
    c.mode = "loglik"  # with model: loglik | generate | stereoset
    c.model = none(str)  # a preset name of regift_jax.models, a Hugging Face dir or a .gguf file
    # Import mode (instead of model): the ReGiFT authors' JSON list [{example_id, prompt,
    # generated_text, context_condition}] or JSONL rows {example_id, generation[, category]}.
    c.generations = none(str)
    c.out = ""  # output directory (required)
    # XLA flags for a CPU-only JAX install, applied by the command line before JAX starts.
    c.xla_cpu_flags = "config"
    c.data = _section(
        bbq_dir="",  # <Category>.jsonl files; "" = the data root's bbq/ (REGIFT_DATA_DIR)
        categories="",  # comma list; "" = every category in bbq_dir (import mode: required)
        max_items=none(int),  # a deterministic balanced subset of this many items in total
        max_items_per_category=none(int),  # cap every BBQ category (balanced subset)
        subset_seed=0,
        stereoset_file="",  # "" = the data root's stereoset/stereoset_dev_flat.jsonl
        stereoset_splits="intrasentence,intersentence")
    c.prompt = _section(
        template="bbq_base",  # regift_jax.core.prompts: bbq_base, bbq_reasoning, bbq_cot, ...
        chat="auto",  # wrap in the tokenizer's chat template: auto (when it has one) | on | off
        system=none(str))  # system turn (None: the template's own)
    c.generate = _section(
        max_new_tokens=none(int),  # None: 512, or only max_total_tokens when that is set
        # prompt + generated tokens per item (the authors' max_length); None: no such cap
        max_total_tokens=none(int),
        stop=none(tuple),  # stop strings; None: per template, (): none
        temperature=0.0, top_p=1.0, top_k=0, seed=0,
        # judge the template's prefill + the generation (True), or the generation alone as the
        # authors' scripts did (they sliced the whole prompt off the output)
        score_prefill=True)
    c.loglik = _section(
        method="prefix",  # prefix (shared KV cache) | packed | unpacked: identical scores
        seq_len=512,  # packed row length and longest prompt + option accepted
        answer_format="{option}",  # the scored continuation
        # template: prompt.template's prompt, the three options as answer_format; lm_eval:
        # lm-eval's bbq requests and per-item rules, so report["lm_eval"] holds lm-eval's
        # metrics (prompt.template and answer_format unused, never chat-wrapped)
        format="template")
    c.judge = _section(
        tie_break="first",  # an answer naming several options: first mentioned | unparseable
        overlap_threshold=0.8,  # paper scorer: gold-token overlap needed
        letter_options=False,  # (A)/(B)/(C) prompts: "answer is (X)" decides (generate sets it)
        strict=False)  # import mode: malformed rows, unknown ids, empty generations are errors
    c.report = _section(
        bootstrap_resamples=1000, confidence=0.95, seed=0, title=none(str),
        reference_static=none(str),  # the authors' evaluation_stats.json: per-item agreement
        compare=none(str),  # an earlier report.json: also comparison.md / comparison.png
        compare_labels="before,after")
    c.runtime = _section(
        batch_size=8,  # rows per batch (generate: sequences; loglik: items)
        dtype=none(str),  # compute dtype; None: the model's (float32)
        mesh=none(str),  # over this process's devices, e.g. "data=-1"; None: no mesh
        progress=True)
    # Several processes (regift_jax.core.distributed, regift_jax.eval.hosts): the keys and
    # environment variables of the training config's section.  initialize: auto (when JAX_COORDINATOR_ADDRESS /
    # coordinator_address is set or a multi-host TPU is detected) | always | never;
    # num_processes / process_id: -1 = $JAX_NUM_PROCESSES / $JAX_PROCESS_ID.
    c.distributed = _section(initialize="auto", coordinator_address="", num_processes=-1,
                             process_id=-1, initialization_timeout=300)
    c.lock()
    return c


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The base config (``--config=regift_jax/eval/config.py``); presets: ``configs/eval.py``."""
    if arg:
        raise ValueError(f"regift_jax/eval/config.py takes no argument (got {arg!r}); presets "
                         f"are in configs/eval.py")
    return base_config()


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

# (flags, config key, help); the flag's type and choices follow the key.  Boolean keys: the flag
# sets True, except --no_progress, which sets runtime.progress to False.
FLAGS: Tuple[Tuple[Tuple[str, ...], str, str], ...] = (
    (("--generations",), "generations", "import mode: JSON list [{example_id, prompt, "
     "generated_text, context_condition}] or JSONL [{example_id, generation}] keyed by BBQ "
     "example_id"),
    (("--model",), "model", "model modes: a preset name (e.g. smollm2-135m-instruct), a Hugging "
     "Face directory or a .gguf file"),
    (("--mode",), "mode", "loglik: multiple choice by summed option log-probability; generate: "
     "the sampler answers, judged like --generations; stereoset: StereoSet LM/SS/ICAT"),
    (("--out",), "out", "output directory (required)"),
    (("--category", "--categories"), "data.categories", "BBQ category (e.g. Religion), or several "
     "separated by commas (import mode: rows then need a 'category' field); required with "
     "--generations, model modes default to every category in --bbq_dir"),
    (("--bbq_dir",), "data.bbq_dir", "directory of <Category>.jsonl BBQ files (default: the data "
     "root's bbq/, $REGIFT_DATA_DIR or the vendored data/bbq)"),
    (("--max_items",), "data.max_items", "a deterministic balanced subset of this many items in "
     "total (StereoSet: items)"),
    (("--max_items_per_category",), "data.max_items_per_category",
     "cap every BBQ category at this many items (balanced subset)"),
    (("--subset_seed",), "data.subset_seed", "seed of the subset selection"),
    (("--stereoset_file",), "data.stereoset_file", "stereoset: flattened StereoSet jsonl "
     "(default: the data root's stereoset/stereoset_dev_flat.jsonl)"),
    (("--stereoset_splits",), "data.stereoset_splits", "stereoset: splits to score"),
    (("--prompt",), "prompt.template", "prompt template (regift_jax.core.prompts): bbq_base, "
     "bbq_reasoning, bbq_cot, bbq_authors_released, ..."),
    (("--chat",), "prompt.chat", "wrap prompts in the tokenizer's chat template (auto: when it "
     "has one)"),
    (("--system",), "prompt.system", "system turn for the chat template (default: the "
     "template's own)"),
    (("--max_new_tokens",), "generate.max_new_tokens", "generate: new-token limit (default 512; "
     "--config.generate.max_total_tokens caps prompt + generation instead, as the authors "
     "did)"),
    (("--stop",), "generate.stop", "generate: stop string (repeatable; default per template, "
     "e.g. </answer> for bbq_reasoning); --stop= alone disables them"),
    (("--temperature",), "generate.temperature", "generate: 0 = greedy"),
    (("--top_p",), "generate.top_p", "generate: nucleus mass"),
    (("--top_k",), "generate.top_k", "generate: top-k (0 = off)"),
    (("--sample_seed",), "generate.seed", "generate: sampling seed"),
    (("--loglik_method",), "loglik.method", "loglik: shared-prefix KV cache (fastest), packed "
     "rows with segment ids, or one sequence per row; identical scores"),
    (("--seq_len",), "loglik.seq_len", "loglik: packed row length and longest prompt+option "
     "accepted"),
    (("--answer_format",), "loglik.answer_format", "loglik: the scored continuation, {option} = "
     "the option text"),
    (("--tie_break",), "judge.tie_break", "standard parser: an answer naming several options -> "
     "the first mentioned, or unparseable"),
    (("--overlap_threshold",), "judge.overlap_threshold", "paper scorer: gold-token overlap "
     "needed"),
    (("--letter_options",), "judge.letter_options", "the prompt listed the options as "
     "(A)/(B)/(C) (bbq_cot): a final 'answer is (X)' decides the standard judgement (the "
     "generate mode sets this itself for such templates)"),
    (("--strict",), "judge.strict", "error on malformed rows, unknown example ids and empty "
     "generations instead of counting them"),
    (("--bootstrap_resamples",), "report.bootstrap_resamples", "bootstrap resamples for the "
     "intervals, 0 = none"),
    (("--confidence",), "report.confidence", "bootstrap interval level"),
    (("--seed",), "report.seed", "bootstrap PRNG seed"),
    (("--title",), "report.title", "report title"),
    (("--reference_static",), "report.reference_static", "the authors' evaluation_stats.json: "
     "report per-item agreement of the paper-compatible judgement with their static results"),
    (("--compare",), "report.compare", "an earlier report.json: also write comparison.md / "
     "comparison.png"),
    (("--compare_labels",), "report.compare_labels", "labels for --compare"),
    (("--batch_size",), "runtime.batch_size", "rows per batch (generate: sequences; loglik: "
     "items)"),
    (("--dtype",), "runtime.dtype", "compute dtype (float32, bfloat16; default: the model's, "
     "float32)"),
    (("--mesh",), "runtime.mesh", "device mesh, e.g. data=-1 or data=2,fsdp=4 (batches are "
     "sharded over the data axes; default: none)"),
    (("--no_progress",), "runtime.progress", "no progress bar"),
    (("--xla_cpu_flags",), "xla_cpu_flags", configs_util.XLA_CPU_FLAGS_HELP),
)

_USAGE = """Evaluate on BBQ (standard option parsing, the ReGiFT authors' exact-match scorer, BBQ
bias scores; report.json / report.md / bbq.png) or StereoSet.
  import:  --generations=FILE --category=C --out=DIR
  model:   --model=PRESET|HF_DIR|FILE.gguf --mode=loglik|generate|stereoset --out=DIR
           [--prompt=bbq_base|bbq_reasoning|bbq_cot|bbq_authors_released] [--categories=...]
           [--max_items=N] [--batch_size=B] [--max_new_tokens=T]
  config:  --config=configs/eval.py[:loglik|generate|cot|paper_eval|stereoset]
           [--config.KEY=VALUE ...]
           (every flag below is an alias of the config key in brackets)"""


def get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value) -> None:
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    try:
        node[name] = value
    except TypeError as e:
        raise InputError(f"config key {key}: {e}") from None


def _key_type(cfg, key: str) -> type:
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    value = node[name]
    return type(value) if value is not None else node.get_ref(name).get_type()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`InputError` (one line, not the usage)."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def make_parser() -> argparse.ArgumentParser:
    """The flags of :data:`FLAGS` (defaults suppressed: only given flags change the config)."""
    base = base_config()
    p = _Parser(prog="python -m regift_jax.evaluate", description=_USAGE,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="config file FILE.py[:ARG] (default: the base config of "
                   "regift_jax/eval/config.py); --config.KEY=VALUE sets any key")
    for flags, key, text in FLAGS:
        kind, default = _key_type(base, key), get(base, key)
        help_ = f"{text} [{key}, default: {default!r}]".replace("%", "%%")
        kw = {"dest": key, "help": help_}
        if kind is bool:
            kw.update(action="store_const", const=not default)
        elif key in CHOICES:
            kw.update(choices=CHOICES[key])
        else:
            kw.update(metavar=key.rsplit(".", 1)[-1].upper(),
                      **({"action": "append"} if kind is tuple else {"type": kind}))
        p.add_argument(*flags, **kw)
    return p


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[Tuple[str, Optional[str]]]]:
    """``argv`` without its ``--config.KEY[=VALUE]`` / ``--config.KEY VALUE`` /
    ``--noconfig.KEY`` tokens, and those as ``(KEY, text)`` in order (text None: a bare boolean
    flag; ``"false"`` for ``--noconfig``)."""
    rest, out = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        pre = next((p for p in ("--config.", "--noconfig.") if a.startswith(p)), None)
        if pre is None:
            rest.append(a)
            continue
        key, eq, text = a[len(pre):].partition("=")
        if pre == "--noconfig.":
            out.append((key, "false"))
        elif eq:
            out.append((key, text))
        elif i < len(argv) and not argv[i].startswith("--"):  # --config.KEY VALUE
            out.append((key, argv[i]))
            i += 1
        else:
            out.append((key, None))
    return rest, out


def _parse_text(kind: type, key: str, text: Optional[str]):
    if kind is bool:
        low = "true" if text is None else text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise InputError(f"--config.{key}={text!r}: expected a boolean")
        return low in ("true", "1", "yes")
    if text is None:
        raise InputError(f"--config.{key} needs a value (--config.{key}=VALUE)")
    if text in ("None", "none"):
        return None
    try:
        if kind is tuple:
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                raise ValueError("not a tuple")
            return tuple(value)
        return kind(text)
    except (ValueError, SyntaxError):
        raise InputError(f"--config.{key}={text!r} is not a valid {kind.__name__}") from None


def _load(spec: Optional[str]) -> ml_collections.ConfigDict:
    if not spec:
        return base_config()
    try:
        return configs_util.load_config_file(spec)
    except (FileNotFoundError, AttributeError, ValueError) as e:
        raise InputError(f"--config={spec}: {e}") from None


def from_argv(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The evaluation config of a command line (see the module docstring).  ``--help`` exits
    through argparse; a malformed flag, bad keys or values raise :class:`InputError`."""
    rest, overrides = split_overrides(argv)
    args = vars(make_parser().parse_args(rest))
    cfg = _load(args.pop("config", None))
    for key, value in args.items():
        if key == "generate.stop":  # --stop= alone: no stop strings
            value = tuple(x for x in value if x)
        _set(cfg, key, value)
    for key, text in overrides:
        try:
            configs_util.check_key(cfg, key)
        except configs_util.ConfigKeyError as e:
            raise InputError(str(e)) from None
        _set(cfg, key, _parse_text(_key_type(cfg, key), key, text))
    check(cfg)
    return cfg


def check(cfg) -> None:
    """Raise :class:`InputError` when an enumerated key holds a value outside :data:`CHOICES`."""
    for key, valid in CHOICES.items():
        if get(cfg, key) not in valid:
            raise InputError(f"config key {key}={get(cfg, key)!r}; valid: {', '.join(valid)}")


def categories(cfg) -> List[str]:
    """``data.categories`` as a list (empty when not given)."""
    return [c.strip() for c in cfg.data.categories.split(",") if c.strip()]
