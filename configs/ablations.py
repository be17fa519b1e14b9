"""Baselines and ablations as presets of the offline SmolLM2 student (``configs/llama.py``'s
default ``smollm2_135m``), each a whole experiment (BBQ before, training, BBQ after, report):

    python -m regift_jax.train --config=configs/ablations.py:correct
    python -m regift_jax.train --config=configs/ablations.py:frac40
    python -m regift_jax.train --config=configs/ablations.py:"preset=frac40,epochs=3"
    python scripts/run_presets.py --presets=correct,incorrect,all   # several + one table

Every preset writes to its own work directory ``runs/ablations/<preset>`` (relative to the
working directory; run from the repository root, as ``scripts/run_presets.py`` does).

Preset arguments (``parse_arg``): ``preset`` (the name, also accepted bare), ``epochs`` (training
epochs of every preset, default :data:`DEFAULT_EPOCHS`) and ``source`` (the trace set; "" = the
default ``data.source``).

Correctness ablation (paper Section 5), same number of epochs, so the step count follows the data
size (``train.num_steps = -1``: the trainer counts the packed batches of one epoch of the
training split and runs ``ceil(num_epochs x steps_per_epoch)`` steps):

* ``correct``: the teacher's correct traces (paper-lenient criterion) -- ReGiFT itself;
* ``incorrect``: only the incorrect ones (unparseable teacher outputs are dropped by the reader
  from every selection, see ``regift_jax.data.records``);
* ``all``: every parseable trace.

With the default TFDS source the selection is also the builder config
(``data.source = "tfds:regift_traces/<selection>"``).

Data-size ablation, a true subsample at the same epochs (the paper instead reported epoch
checkpoints of one run): ``frac20``, ``frac40``, ``frac60``, ``frac80``, ``frac100`` set
``data.max_examples = max(1, floor(f x N + 0.5))`` where ``N`` is the number of correct traces in
the *training split* (after the held-out split ``data.eval_fraction``/``data.eval_salt``, exactly
as ``regift_jax.training.examples.train_and_eval_examples`` computes it, because ``max_examples``
truncates that list).  ``N`` is counted when the config is built, with the trainer's own reader
(``regift_jax.training.examples.load_examples``: the ``regift_traces`` TFDS builder by default, or
the JSONL shards of a ``source=`` path) and held-out split (``split_heldout``), so ``frac100``
trains on every correct training trace.

Which examples a fraction keeps: the trainer keeps the *first* N of its list, and that order is
fixed, not random at training time: shard files sorted by name, lines in file order (the TFDS
builder stores them in that order), ``select_records`` and ``split_heldout`` preserve it.  The
trace generator (``regift_jax.traces.generate``) writes whole SQuAD paragraphs in an order
shuffled with ``random.Random(data.seed)`` (seed 0 in ``configs/teacher_smollm2.py``), so a prefix
is a seeded random sample of paragraphs (samples of one question stay together), and the subsets
are nested: frac20 is a subset of frac40 of ... of frac100.  The per-epoch batch order is shuffled
by the pipeline with ``config.seed``.  Because ``N`` depends on the trace set and on the selection
and split keys, change the trace set with the ``source=`` preset argument, never with
``--config.data.source`` (that would keep the count of the default set); :data:`COUNT_KEYS`
lists the keys ``scripts/run_presets.py`` refuses to override for counted presets.

Baselines of the paper's Table 3:

* base model: ``regift_jax.experiment`` always trains between its two evaluations (it cannot
  skip training), so there is no ``base_only`` preset; the base model's numbers are the
  ``eval_before`` reports of any run (``modes.<mode>.before`` of every ``experiment.json``),
  which ``scripts/run_presets.py`` collects into the "Base model" rows of its table and checks for
  agreement across runs;
* ``cot``: chain-of-thought prompting, i.e. the base model with the ``bbq_cot`` prompt in
  generate mode (``experiment.generate.prompt = "bbq_cot"``, loglik mode off because it does
  not depend on the prompt; :data:`COT_MAX_NEW_TOKENS` new tokens so the reasoning has room
  before "The answer is (X)").  Its *before* numbers are the CoT baseline; training is that of
  ``correct``, so its *after* numbers are the ReGiFT student under the CoT prompt;
* ``instruction``: supervised fine-tuning on SQuAD-v2 gold answers (``configs/instruction.py``,
  experiment enabled) with the same epochs and the same number of training examples as
  ``correct`` (``data.max_examples = N``; the first N questions of the SQuAD pool split in file
  order, i.e. clustered by article).  ``--config.data.max_examples=-1`` trains on the whole pool
  (about 9,000 questions).

Cost: a 512-token row of the SmolLM2 preset holds about one trace, so a preset runs about
``epochs x N / 4`` steps for its ``N`` training traces.  The shipped trace set (``data/traces``,
26,321 parseable traces) has, after the 5% held-out split, N = 2,261 ``correct`` (540 steps per
epoch), 22,649 ``incorrect`` and 24,910 ``all`` training traces, so ``incorrect`` and ``all`` run
about ten times as many steps as ``correct``; lower ``epochs`` for a quicker, still equal-epoch,
comparison.  Step times: ``BENCHMARKS.md``.
"""

from regift_jax.core import configs_util
from regift_jax.training import examples

PRESETS = ("correct", "incorrect", "all", "frac20", "frac40", "frac60", "frac80", "frac100",
           "cot", "instruction")
FRACTIONS = {"frac20": 0.2, "frac40": 0.4, "frac60": 0.6, "frac80": 0.8, "frac100": 1.0}
SELECTIONS = {"correct": "correct", "incorrect": "incorrect", "all": "all"}
# Presets whose data.max_examples is counted from the trace set at config time.
COUNTED = tuple(FRACTIONS) + ("instruction",)
# Overriding these on the command line would make that count stale.
COUNT_KEYS = ("data.source", "data.selection", "data.criterion", "data.eval_fraction",
              "data.eval_salt", "data.max_examples", "data.kind")
DEFAULT_EPOCHS = 5.0
RUNS_DIR = "runs/ablations"
COT_MAX_NEW_TOKENS = 128


def _student(source: str):
    c = configs_util.sibling_config(__file__, "llama").get_config("smollm2_135m")
    if source:
        c.data.source = source
    return c


def select(c, selection: str):
    """Train on the ``selection`` traces (with a TFDS source: its builder config of that name)."""
    c.data.selection = selection
    if examples.is_tfds_source(c.data.source):
        name, _ = examples.parse_tfds_source(c.data.source)
        c.data.source = f"{examples.TFDS_PREFIX}{name}/{selection}"


def count_training_traces(dcfg) -> int:
    """Number of ``dcfg.selection`` traces of ``dcfg.source`` left for training after the
    held-out split: the length of the list that ``data.max_examples`` truncates in the trainer."""
    try:
        ex, _ = examples.load_examples(dcfg)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"configs/ablations.py: cannot count the traces of "
                                f"data.source={dcfg.source!r}: {e}") from e
    train, _ = examples.split_heldout(ex, float(dcfg.eval_fraction), str(dcfg.eval_salt))
    return len(train)


def fraction_size(fraction: float, n: int) -> int:
    """``max(1, floor(fraction x n + 0.5))`` (round half up, never 0: 0 would mean 'all')."""
    if n <= 0:
        raise ValueError("no training traces to subsample")
    return max(1, min(n, int(fraction * n + 0.5)))


def get_config(arg=None):
    a = configs_util.parse_arg(arg, preset="correct", epochs=DEFAULT_EPOCHS, source="")
    name = a.preset
    if name not in PRESETS:
        hint = ""
        if name == "base_only":
            hint = (" (the experiment runner always trains, so the base model has no preset of "
                    "its own: its numbers are the eval_before reports, modes.<mode>.before of "
                    "any run's experiment.json, collected as the 'Base model' rows by "
                    "scripts/run_presets.py)")
        raise ValueError(f"configs/ablations.py: unknown preset {name!r}{hint}; valid: "
                         f"{', '.join(PRESETS)}")
    if float(a.epochs) <= 0:
        raise ValueError(f"configs/ablations.py: epochs={a.epochs} must be > 0")

    if name == "instruction":
        student = _student(a.source)
        n = count_training_traces(student.data)
        c = configs_util.sibling_config(__file__, "instruction").get_config("smollm2_135m")
        c.data.max_examples = fraction_size(1.0, n)
        c.preset = f"ablations:instruction[max_examples={c.data.max_examples}=N_correct]"
    else:
        c = _student(a.source)
        select(c, SELECTIONS.get(name, "correct"))
        c.preset = f"ablations:{name}"
        if name in FRACTIONS:
            n = count_training_traces(c.data)
            c.data.max_examples = fraction_size(FRACTIONS[name], n)
            c.preset = f"ablations:{name}[max_examples={c.data.max_examples}/{n}]"
        if name == "cot":
            c.experiment.modes = "generate"
            c.experiment.generate.prompt = "bbq_cot"
            c.experiment.generate.max_new_tokens = COT_MAX_NEW_TOKENS
            c.experiment.generate.est_seconds = 2 * int(c.experiment.generate.est_seconds)
    c.experiment.enabled = True
    c.train.num_steps = -1  # steps follow the data size
    c.train.num_epochs = float(a.epochs)
    c.workdir = f"{RUNS_DIR}/{name}"
    return c
