"""Llama-family students: the offline SmolLM2 default and the paper's Llama-3.1-8B.

    python -m regift_jax.train --config=configs/llama.py --workdir=/tmp/smollm2
    python -m regift_jax.train --config=configs/llama.py:llama3_1_8b --workdir=...
    python -m regift_jax.train --config=configs/llama.py:llama3_1_8b_full --workdir=...

Presets (``get_config("name")`` or ``"preset=name"``):

* ``smollm2_135m`` (default): SmolLM2-135M-Instruct loaded offline from its GGUF
  (``regift_jax.models.load("smollm2-135m-instruct")``), LoRA r16 alpha 32 dropout 0.05 on
  q_proj/v_proj, on the shipped trace set ``data/traces/`` (read through the ``regift_traces``
  TFDS builder, the base config's ``data.source``); a bounded CPU run (float32 compute, which is
  faster than bfloat16 on CPU; rows of 512 tokens, batch 4, 16 steps, evaluation and
  checkpoints every 8), sized so that the whole experiment fits in 15 minutes on a 2-core CPU
  (step times: ``BENCHMARKS.md``).
* ``llama3_1_8b``: the paper's student (Llama-3.1-8B, authors' repo ``meta-llama/Llama-3.1-8B``)
  with the authors' LoRA recipe: r16, alpha 32, dropout 0.05 on q_proj/v_proj, lr 2e-4, linear
  decay (HF Trainer's default) after 5% warmup, weight decay 0.01, clip 1.0 (HF default),
  10 epochs, 32 examples per optimizer step (``data.batch_unit = "examples"``, one unpacked
  example per row, as the authors' 4 per device x 4 GPUs x 2 accumulation steps, so an epoch of
  the paper's correct set is the released checkpoints' 3,177 steps; here one micro-batch of 32,
  ``train.micro_batch=16`` accumulates twice), max length 1024, bf16 compute with fp32 master
  weights, FSDP, remat full, ``attention_impl="auto"`` (the Pallas splash kernel on TPU)
  (by the TPU preflight, LoRA fits a v5e-8 at 9.2 of 16 GiB per chip, estimated 2,925 tokens/s
  per chip, and full fine-tuning a v6e-8 at 20.5 of 32 GiB, 9,903 tokens/s per chip, MFU 50%).
  On a v5p (95 GiB per chip) keeping the activations is faster and fits:
  ``--config.model.remat_policy=dots_with_no_batch_dims`` (LoRA on a v5p-8: 38.1 GiB per chip,
  estimated 10,474 tokens/s per chip, MFU 72%; BENCHMARKS.md "TPU by compilation").
* ``llama3_1_8b_full``: NOT in the paper (which fine-tunes with LoRA only): a full fine-tuning
  variant of the same recipe for comparison, lr 2e-5, same schedule.

The model name ``llama-3.1-8b`` must resolve through ``regift_jax.models.load``: a preset of
``regift_jax.models`` with its weights under ``$REGIFT_MODELS_DIR``, or override
``--config.model.name=/path/to/hf_dir``.
"""

from regift_jax.core import configs_util

PRESETS = ("smollm2_135m", "llama3_1_8b", "llama3_1_8b_full")


def paper_recipe(c, model_name: str, full_ft: bool = False):
    """The paper / authors' repo hyper-parameters on top of the base config (``full_ft``: the
    full fine-tuning variant, which the paper does not have)."""
    c.model.name = model_name
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # recompute each layer in the backward pass: saving the MLP's activations
    # (dots_with_no_batch_dims) needs 37 GiB per chip on a v5e-8 for LoRA, 61 on a v6e-8 for full
    # fine-tuning (sixth session); "full" fits both (now 9.2 and 20.5 GiB; BENCHMARKS.md "TPU by
    # compilation")
    c.model.remat_policy = "full"
    # TPU preflight tuning (BENCHMARKS.md "TPU by compilation"): the splash kernel on TPU, the
    # decoder's einsum elsewhere; the 32 examples in one micro-batch (no gradient accumulator,
    # one weight all-gather per step): full fine-tuning on a v6e-8 5,952 -> 9,903 tokens/s per
    # chip (estimate) and 27.6 -> 20.5 GiB per chip
    c.model.attention_impl = "auto"
    c.lora.enabled = not full_ft
    c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
    c.lora.targets = ("q_proj", "v_proj")
    c.optim.learning_rate = 2e-5 if full_ft else 2e-4
    c.optim.schedule = "linear"
    c.optim.warmup_fraction = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.data.batch_unit, c.data.packing = "examples", "none"
    c.train.global_batch = 32
    # the whole batch at once; its rows must split over the batch shards (mesh data x fsdp): on
    # more than 32 of them, or where it does not fit (the trainer's memory check says what
    # does), set e.g. 16 (the authors' 2 accumulation steps)
    c.train.micro_batch = -1
    c.train.grad_accum_steps = 1
    c.train.num_steps = -1
    c.train.num_epochs = 10.0
    c.data.seq_len = 1024
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 500
    c.log.every_steps = 10
    return c


def smollm2_cpu(c):
    """The offline default: a bounded LoRA run of SmolLM2-135M-Instruct on 2 CPU cores."""
    c.model.name = "smollm2-135m-instruct"
    c.workdir = "runs/regift_smollm2"
    c.experiment.enabled = True  # evaluate before, train, evaluate after, report
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    c.lora.enabled = True
    c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
    c.lora.targets = ("q_proj", "v_proj")
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_fraction = 0.05
    c.train.global_batch = 4
    c.train.num_steps = 16
    c.data.seq_len = 512
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.checkpoint.every_steps = 8
    c.checkpoint.keep = 2
    c.eval.every_steps = 8
    c.eval.max_batches = 2
    c.log.every_steps = 2
    return c


def get_config(arg=None):
    a = configs_util.parse_arg(arg, preset="smollm2_135m")
    c = configs_util.base_config()
    c.preset = a.preset
    if a.preset == "smollm2_135m":
        smollm2_cpu(c)
    elif a.preset == "llama3_1_8b":
        paper_recipe(c, "llama-3.1-8b")
    elif a.preset == "llama3_1_8b_full":
        paper_recipe(c, "llama-3.1-8b", full_ft=True)
    else:
        raise ValueError(f"configs/llama.py: unknown preset {a.preset!r}; valid: "
                         f"{', '.join(PRESETS)}")
    return c
