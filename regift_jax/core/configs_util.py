"""Training configuration: the base ``ConfigDict`` every preset starts from, preset-argument
parsing (big_vision style) and strict command-line override checking.

Config files (``configs/llama.py``, ``configs/mistral.py``, ``configs/phi4.py``,
``configs/instruction.py``) define ``get_config(arg=None)``; the trainer is launched with::

    python -m regift_jax.train --config=configs/llama.py[:ARG] [--config.KEY=VALUE ...]

``ARG`` is parsed by :func:`parse_arg`: ``"llama3_1_8b"`` (a bare preset name) or
``"preset=llama3_1_8b,full_ft=True"`` (``key=value`` pairs; values are parsed as Python literals
where possible).  Every value of the returned config is overridable with ``--config.a.b=v``.
An override naming a key that does not exist fails *before* training with the list of valid keys
(:func:`check_overrides`); ``ml_collections`` alone raises a bare ``AttributeError``.

:func:`base_config` documents every knob in one place; the trainer reads nothing else (no hidden
constants in modules).  Sections:

==============  ====================================================================================
``model``       weights source (preset name / HF dir / .gguf), dtypes, remat policy
``lora``        LoRA on/off, rank, alpha, dropout, target projections
``data``        source (the regift_traces TFDS builder, trace JSONL or SQuAD gold answers),
                selection, prompt template, packing, lengths, held-out evaluation fraction
``train``       steps or epochs, global batch, gradient accumulation, non-finite handling
``optim``       AdamW, schedule, warmup, clipping, weight-decay exclusions
``mesh``        mesh axis sizes (-1 fills) and optional logical-axis rules override
``checkpoint``  orbax cadence, keep-N, async, resume
``eval``        evaluation-loss cadence and size
``log``         metrics cadence, TensorBoard, progress bar, MFU peak FLOPs
``export``      HF export at the end (LoRA merged)
``experiment``  the BBQ evaluation before and after training around the run
``distributed`` multi-host initialisation
==============  ====================================================================================
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from importlib import metadata
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import ml_collections

from regift_jax.core.paths import REPO_ROOT


# ============================================================================ preset arguments
def _literal(v: str):
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
    """big_vision-style config argument: ``"name"`` or ``"k1=v1,k2=v2"`` (or both:
    ``"name,k=v"``, the bare token goes to the first default key).

    Every key must be one of ``defaults``; values are converted to the default's type (a default
    of ``None`` keeps the Python literal).  Unknown keys raise ``ValueError`` naming the valid
    ones.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    keys = list(defaults)
    for i, tok in enumerate(t for t in arg.split(",") if t.strip()):
        tok = tok.strip()
        if "=" in tok:
            k, v = (s.strip() for s in tok.split("=", 1))
        elif i == 0 and keys:
            k, v = keys[0], tok
        else:
            raise ValueError(f"config argument {arg!r}: {tok!r} is not key=value")
        if k not in defaults:
            raise ValueError(f"config argument {arg!r}: unknown key {k!r}; valid: "
                             f"{', '.join(keys)}")
        d = defaults[k]
        if isinstance(d, bool):
            low = v.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"config argument {k}={v!r}: expected a boolean")
            val = low in ("true", "1", "yes")
        elif isinstance(d, int):
            val = int(v)
        elif isinstance(d, float):
            val = float(v)
        elif isinstance(d, str):
            val = v
        else:
            val = _literal(v)
        out[k] = val
    return out


# ============================================================================ the base config
def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # A preset name of regift_jax.models (e.g. "smollm2-135m-instruct"), a Hugging Face
    # safetensors directory, or a .gguf file; loaded by regift_jax.models.load (never downloads
    # unless download=True).
    m.name = "smollm2-135m-instruct"
    m.download = False
    # The keys below are how the model runs, not what it is: training.state.run_config builds
    # the decoder's RunConfig from them (the lora section becomes its LoraConfig).
    m.param_dtype = "float32"  # master weights (and optimizer state) dtype
    m.dtype = "bfloat16"  # compute dtype (activations, matmuls)
    m.remat_policy = "none"  # none | full | dots | dots_with_no_batch_dims | nothing_saveable
    # Causal query chunks of attention (tokens; 0 = one [T, T] score matrix per head).
    m.attention_chunk = 128
    # LM head + loss on the loss positions only, this many positions per chunk (0 = full logits).
    m.loss_chunk = 512
    # Attention without a KV cache: "einsum" (the decoder's, chunked as above), "xla" or "cudnn"
    # (jax.nn.dot_product_attention; "cudnn" = cuDNN flash attention, NVIDIA GPUs, bf16/fp16),
    # "splash" (the Pallas TPU kernel), "auto" (splash on TPU, einsum elsewhere).
    m.attention_impl = "einsum"
    return m


def _lora() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        enabled=True,  # False: full fine-tuning
        rank=16, alpha=32.0, dropout=0.05, targets=("q_proj", "v_proj")))


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # "traces": teacher traces (regift_jax.data.records schema), response = reasoning + answer.
    # "squad_gold": SQuAD-v2 questions with their gold answer (Instruction baseline).
    d.kind = "traces"
    # traces: "tfds:regift_traces/<config>" streams the regift_traces TFDS builder, built offline
    # from the data root's traces/ into tfds_data_dir (its config must match selection and
    # criterion); or a directory of *.jsonl shards, a glob, a file (relative paths: the working
    # directory first, then the repository root).  squad_gold: a directory holding dev-v2.0.json
    # or dev-v2.0.reconstructed.json ("" = the data root's squad_v2/).
    d.source = "tfds:regift_traces/correct"
    # TFDS data_dir of a tfds: source ("" = $REGIFT_CACHE_DIR/tfds/<digest of the shards>, with
    # REGIFT_CACHE_DIR defaulting to ~/.cache/regift_jax).
    d.tfds_data_dir = ""
    d.selection = "correct"  # traces: correct | incorrect | all
    d.criterion = "lenient"  # traces: lenient | strict_em
    d.squad_split = "pool"  # squad_gold: pool | heldout | validation
    d.squad_num_buckets = 10  # squad_gold: article-hash split, as the SquadV2 builder
    d.squad_pool_buckets = 8
    d.template = "student_train"  # prompt template of regift_jax.core.prompts (name or name@vN)
    # Wrap the prompt in the tokenizer's chat template (BOS and wrapping follow the one rule of
    # regift_jax.core.prompts.encode_prompt, shared with trace generation and evaluation).
    d.chat_template = False
    d.seq_len = 1024  # packed row length (= max example length in tokens)
    # What train.global_batch counts: "tokens" = packed rows of seq_len tokens (several examples
    # per row, the token budget of a step is fixed); "examples" = examples, one per row
    # (packing "none"), as the paper's 32 examples per optimizer step.
    d.batch_unit = "tokens"
    d.packing = "first_fit"  # first_fit | sequential | none
    d.max_open_rows = 16
    d.overlong = "truncate_reasoning"  # drop | truncate_reasoning
    d.boundary = "auto"  # prompt/response tokenization: auto | separate | joint
    d.add_bos = ""  # "" = follow the tokenizer; "true" / "false" force it
    d.add_eos = True
    d.shuffle = True
    d.epoch_boundary = "continue"  # continue | flush
    # Held-out evaluation examples: a deterministic fraction of the training source, chosen by
    # sha256(eval_salt + question id), so every sample of one question lands on the same side.
    d.eval_fraction = 0.05
    d.eval_salt = ""
    d.max_examples = -1  # > 0: use only the first N training examples (ablations, smoke runs)
    d.prefetch = 2
    d.tokenize_chunk = 64
    return d


def _train() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    # Rows per optimizer step, all hosts together: packed sequences (data.batch_unit "tokens")
    # or examples ("examples").
    t.global_batch = 32
    t.grad_accum_steps = 1  # micro-batches per step (global_batch / k rows each)
    # > 0: rows per micro-batch (all hosts), i.e. grad_accum_steps = global_batch / micro_batch;
    # for a batch that does not fit the devices at once.  <= 0: use grad_accum_steps.
    t.micro_batch = -1
    t.num_steps = -1  # > 0: exactly this many steps; else num_epochs * steps_per_epoch
    t.num_epochs = 10.0
    t.max_nonfinite_in_a_row = 5  # halt after this many consecutive skipped steps
    # Persistent XLA compilation cache ("" = off): a restarted (preempted) job reuses compiled
    # steps instead of recompiling them.
    t.compilation_cache_dir = ""
    # A work directory remembers the model and data it trains on (run.json); resuming it with
    # another model or data is refused unless this is True (the override is then recorded).
    t.resume_override = False
    # On a device that reports its memory (TPU, GPU): compile the step before the first one and
    # refuse one that does not fit, saying what would (regift_jax.training.memory).
    t.memory_check = True
    return t


def _optim() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.learning_rate = 2e-4
    o.schedule = "linear"  # linear | cosine | constant (after warmup)
    o.warmup_fraction = 0.05  # of the total steps; used when warmup_steps < 0
    o.warmup_steps = -1
    o.end_lr_fraction = 0.0  # final lr = learning_rate * end_lr_fraction
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.01
    # Regexes matched (re.search) against "/"-joined parameter paths; matching parameters get no
    # weight decay: RMSNorm scales, biases and the token embedding.  An untied lm_head is a
    # projection and is decayed.
    o.no_decay = ("(^|/)scale$", "(^|/)bias$", "^embed_tokens$")
    o.clip_norm = 1.0  # global-norm gradient clipping (<= 0: off)
    return o


def _mesh() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical-axis rules as ((logical, mesh axes or None), ...); () = sharding.DEFAULT_RULES.
    # Entries given here replace the default entry of the same logical name.
    m.rules = ()
    return m


def _run_sections() -> Dict[str, ml_collections.ConfigDict]:
    """checkpoint, eval, log, export and distributed: how a run saves, measures and starts."""
    checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500,  # <= 0: only final / preemption saves
        keep=3, async_save=True,
        resume=True))  # resume from the latest readable checkpoint in workdir
    evaluation = ml_collections.ConfigDict(dict(
        every_steps=500,  # <= 0: only at the end
        max_batches=-1,  # > 0: cap the held-out batches per evaluation
        at_start=False))
    # peak_flops_per_device: peak FLOP/s of ONE device for MFU; <= 0: known accelerators from a
    # table, CPU measured once at start-up with a float32 matmul
    # (regift_jax.training.metrics.peak_flops_per_device).
    logging = ml_collections.ConfigDict(dict(
        every_steps=10, tensorboard=True, progress_bar=True, peak_flops_per_device=-1.0))
    export = ml_collections.ConfigDict(dict(
        enabled=True,
        path="",  # "" = <workdir>/export
        dtype="float32"))  # float32 | bfloat16 | float16
    # initialize: auto = when JAX_COORDINATOR_ADDRESS / coordinator_address is set or a
    # multi-host TPU environment is detected; always | never.  num_processes / process_id: -1 =
    # $JAX_NUM_PROCESSES / $JAX_PROCESS_ID.
    distributed = ml_collections.ConfigDict(dict(
        initialize="auto", coordinator_address="", num_processes=-1, process_id=-1,
        initialization_timeout=300))
    return {"checkpoint": checkpoint, "eval": evaluation, "log": logging, "export": export,
            "distributed": distributed}


def _experiment() -> ml_collections.ConfigDict:
    """The whole ReGiFT experiment around training (regift_jax.experiment): BBQ evaluation of
    the base student, training, the same evaluation of the exported student, a before/after
    report.  Off by default; the offline default preset turns it on."""
    e = ml_collections.ConfigDict()
    e.enabled = False
    e.modes = "loglik,generate"  # comma list of loglik | generate
    # Chat wrapping of the evaluation prompts: "train" = the format the student is trained on
    # (data.chat_template), or auto | on | off (eval_chat).
    e.chat = "train"
    e.categories = ""  # "" = every BBQ category found in data/bbq
    e.subset_seed = 0
    e.bootstrap_resamples = 200
    e.train_est_seconds = 600  # only for the "time left" estimate
    e.loglik = ml_collections.ConfigDict(dict(
        prompt="bbq_base", max_items_per_category=50, batch_size=8, max_new_tokens=0,
        est_seconds=120))
    # 4 items of each of the 6 vendored categories (24) in 2 batches; 128 new tokens: the longest
    # training target of the shipped traces, <think> R </think>\n<answer> A </answer> + EOS, is 91
    # tokens, so a student that writes what it was trained on finishes.
    e.generate = ml_collections.ConfigDict(dict(
        prompt="bbq_reasoning", max_items_per_category=4, batch_size=12, max_new_tokens=128,
        est_seconds=150))
    return e


def eval_chat(config) -> str:
    """The evaluation config's ``prompt.chat`` (auto | on | off) of ``config.experiment.chat``:
    ``"train"`` gives the format the student is trained on (``data.chat_template``)."""
    chat = str(config.experiment.chat)
    if chat == "train":
        return "on" if bool(config.data.chat_template) else "off"
    if chat not in ("auto", "on", "off"):
        raise ValueError(f"experiment.chat={chat!r}; valid: train, auto, on, off")
    return chat


def base_config() -> ml_collections.ConfigDict:
    """Every knob of the trainer with its default.  Presets change values, never add keys."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init of LoRA adapters, dropout, data order
    c.workdir = ""  # required (or --workdir): checkpoints, TensorBoard, metrics, export
    c.preset = ""  # informational: which preset built this config
    # XLA flags for a CPU-only JAX install, applied by the entry points before JAX starts
    # (apply_xla_cpu_flags; ignored when an accelerator plugin is installed or the user's
    # XLA_FLAGS already sets the same flag; "" = none, the default).  The opt-in
    # XNNPACK_DOT_FLAGS is faster on CPU but not bitwise reproducible across a kill and resume
    # (BENCHMARKS.md), so it is off by default.
    c.xla_cpu_flags = ""
    c.model = _model()
    c.lora = _lora()
    c.data = _data()
    c.train = _train()
    c.optim = _optim()
    c.mesh = _mesh()
    for name, section in _run_sections().items():
        c[name] = section
    c.experiment = _experiment()
    return c


# ============================================================================ overrides
def flat_keys(cfg, prefix: str = "") -> List[str]:
    """Every dotted key of a (nested) ConfigDict, sections included."""
    out = []
    for k in sorted(cfg.keys()):
        v = cfg[k]
        full = f"{prefix}{k}"
        out.append(full)
        if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            out.extend(flat_keys(v, full + "."))
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a.b": v}`` for a nested plain dict (run identities and manifests are compared flat)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class ConfigKeyError(KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


def check_key(cfg, key: str) -> None:
    """Raise :class:`ConfigKeyError` listing the valid keys when ``key`` is not in ``cfg``."""
    node, parts = cfg, key.split(".")
    for i, p in enumerate(parts):
        here = ".".join(parts[:i])
        if not isinstance(node, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            raise ConfigKeyError(f"unknown config key {key!r}: {here!r} is a value, not a section")
        if p not in node:
            where = f"section {here!r}" if here else "the top level"
            valid = ", ".join(sorted(node.keys()))
            close = difflib.get_close_matches(p, list(node.keys()), n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + [close[0]])!r}?)" if close else ""
            raise ConfigKeyError(f"unknown config key {key!r}{hint}; valid keys in {where}: "
                                 f"{valid}")
        node = node[p]


def override_keys(argv: Sequence[str], flag: str = "config") -> List[str]:
    """Dotted keys of ``--config.a.b=v`` / ``--config.a.b v`` / ``--noconfig.a.b`` arguments."""
    keys = []
    for a in argv:
        if a == "--":
            break
        for pre in (f"--{flag}.", f"-{flag}.", f"--no{flag}.", f"-no{flag}."):
            if a.startswith(pre):
                keys.append(a[len(pre):].split("=", 1)[0])
                break
    return keys


def config_file_arg(argv: Sequence[str], flag: str = "config") -> Optional[str]:
    for i, a in enumerate(argv):
        for pre in (f"--{flag}=", f"-{flag}="):
            if a.startswith(pre):
                return a[len(pre):]
        if a in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str):
    """``"path.py[:arg]"`` -> the module's ``get_config(arg)`` (as ml_collections does)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        alt = os.path.join(REPO_ROOT, path)
        if os.path.exists(alt):
            path = alt
        else:
            raise FileNotFoundError(f"config file {path!r} not found")
    mod = load_module(os.path.abspath(path))
    if not hasattr(mod, "get_config"):
        raise AttributeError(f"{path}: no get_config()")
    return mod.get_config(arg) if arg else mod.get_config()


def load_module(path: str):
    """Import a config file by path (config files are not a package on ``sys.path``)."""
    name = "regift_config_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    s = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def sibling_config(this_file: str, name: str):
    """The module ``<dir of this_file>/<name>.py`` (e.g. configs/llama.py from configs/phi4.py)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), name + ".py"))


# The opt-in value of config.xla_cpu_flags measured in BENCHMARKS.md.
XNNPACK_DOT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type= "
                     "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")

_ACCELERATOR_DISTS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _accelerator_plugin_installed() -> bool:
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith(_ACCELERATOR_DISTS):
            return True
    return False


def resolve_xla_cpu_flags(value: str) -> str:
    """A command line's ``--xla_cpu_flags`` value: ``"config"`` = the base config's
    ``xla_cpu_flags``, ``"xnnpack"`` = :data:`XNNPACK_DOT_FLAGS`, anything else = the flags."""
    if value == "config":
        return base_config().xla_cpu_flags
    if value == "xnnpack":
        return XNNPACK_DOT_FLAGS
    return value


XLA_CPU_FLAGS_HELP = ("XLA CPU flags applied before JAX starts, as the entry points do ('config' = "
                      "the base config's xla_cpu_flags, off by default; 'xnnpack' = "
                      "configs_util.XNNPACK_DOT_FLAGS; '' = none)")


def apply_cli_xla_cpu_flags(value: str) -> str:
    """A command line's ``--xla_cpu_flags`` value (:data:`XLA_CPU_FLAGS_HELP`), resolved and
    applied: :func:`apply_xla_cpu_flags` of :func:`resolve_xla_cpu_flags`."""
    return apply_xla_cpu_flags(resolve_xla_cpu_flags(value))


def apply_xla_cpu_flags(flags: str, env=None) -> str:
    """Append ``flags`` (``config.xla_cpu_flags``) to ``XLA_FLAGS`` in ``env`` (default
    ``os.environ``) and return the value set.  Call before the first JAX computation (XLA reads
    the variable when its backend starts).  Skipped when ``flags`` is empty, when
    ``JAX_PLATFORMS`` names something other than cpu, or when a CUDA/ROCm/TPU plugin is installed
    (a GPU or TPU jaxlib may not know these CPU flags and aborts on unknown ones); a flag the user
    already set in ``XLA_FLAGS`` is kept as the user wrote it."""
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    if not flags.strip():
        return current
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and platforms != "cpu":
        return current
    if _accelerator_plugin_installed():
        return current
    have = {f.split("=", 1)[0] for f in current.split()}
    add = [f for f in flags.split() if f.split("=", 1)[0] not in have]
    if add:
        env["XLA_FLAGS"] = " ".join([current.strip()] + add if current.strip() else add)
    return env.get("XLA_FLAGS", "")


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
    """Load the config file named by ``--config=PATH[:ARG]`` (so a bad file, preset or argument
    is reported in one line rather than inside ml_collections' traceback) and validate every
    ``--config.KEY`` of ``argv`` against it; raises :class:`ConfigKeyError` (message lists the
    valid keys), ``ValueError``, ``FileNotFoundError`` or ``AttributeError``."""
    spec = config_file_arg(argv, flag)
    if spec is None:
        return
    cfg = load_config_file(spec)
    for k in override_keys(argv, flag):
        check_key(cfg, k)


def merge_rules(default_rules: Iterable[Tuple[str, Any]], override: Iterable) -> Tuple:
    """Rules table = defaults with entries of ``override`` (same logical name) replaced/added."""
    table: Dict[str, Any] = {k: v for k, v in default_rules}
    for item in override or ():
        if len(item) != 2:
            raise ValueError(f"mesh.rules entry {item!r} is not (logical_name, mesh_axes)")
        k, v = item
        if isinstance(v, list):
            v = tuple(v)
        table[str(k)] = v
    return tuple(table.items())


def to_dict(cfg) -> dict:
    """JSON-friendly dict of a ConfigDict (tuples become lists)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


__all__ = ["parse_arg", "base_config", "check_key", "check_overrides", "override_keys",
           "load_config_file", "merge_rules", "flat_keys", "ConfigKeyError"]

if __name__ == "__main__":  # print every key with its default
    for k in flat_keys(base_config()):
        print(k)
    sys.exit(0)
