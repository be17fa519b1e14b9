"""The base of every teacher config (``configs/teacher_*.py``): every key trace generation reads.

Defaults are the paper's decoding (greedy, 512 new tokens, one sample per question, stop at
``</answer>``); a teacher config starts from :func:`base_config` and changes what differs.

- ``teacher``: ``model`` (preset name, HF directory or ``.gguf`` file for
  ``regift_jax.models.load``), ``name`` (the label recorded in every trace and the manifest;
  "" = derived from the model: the GGUF file name or the HF config's ``_name_or_path``; a typed
  name must contain the model's own name), ``dtype``, ``chat`` (wrap the prompt in the
  tokenizer's chat template), ``mesh`` (one teacher sharded over every device of the slice, in the
  evaluator's ``--mesh`` syntax: ``"tensor=-1"``, ``"fsdp=-1,tensor=8"``, with the training
  logical-axis rules; on several hosts they generate in lockstep and process 0 writes; "" = each
  process its own unsharded copy on one device).
- ``prompt``: ``template`` / ``version`` (``regift_jax.core.prompts``; version 0 = latest),
  ``prefill`` (None = the template's own).
- ``data``: ``squad_dir`` ("" = the data root's ``squad_v2/``; a directory with the official
  ``dev-v2.0.json`` / ``train-v2.0.json``, or a Hugging Face ``squad_v2`` dataset saved with
  ``save_to_disk``), ``squad_file`` ("" = looked up in ``squad_dir`` by split; else an official
  JSON file or a saved HF dataset directory), ``split`` (``pool``, ``heldout``, ``validation``:
  the dev file; ``train``: the train file; ``pool``/``heldout`` split whichever file
  ``squad_file`` names), ``num_buckets`` / ``pool_buckets`` (the article split, ``data.squad``),
  ``max_questions`` (0 = all) and ``answerable_fraction`` (negative = natural mix) with ``seed``:
  the seeded paragraph subsample.
- ``decode``: ``mode`` (``single`` or ``two_phase``), sampling (``temperature``, ``top_p``,
  ``top_k``, ``seed``), budgets (``max_new_tokens`` for ``single``; ``max_reasoning_tokens`` +
  ``max_answer_tokens`` for ``two_phase``), ``chunk`` (decode steps per compiled loop).
- ``num_samples`` per question, ``batch_size``, ``length_bucket`` (prompt padding multiple),
  ``cache_len`` (fixed KV-cache length: one compiled decode program per run; 0 = size per batch).
- ``out_dir``, ``progress`` (tqdm bar), ``distributed`` (``auto``: ``jax.distributed.initialize``
  when a coordinator or TPU pod is detected; ``off``).
- ``resume_override``: continue an ``out_dir`` whose ``manifest.json`` pins other settings (a
  different teacher, data selection, prompt or decoding); the differences are recorded in the
  manifest.  Without it such a resume is refused, listing each difference.
- ``finalize_only``: compact the parts written so far and write summary + data card, generate
  nothing.  ``hardware`` / ``wall_time_s``: for the data card, where the traces were generated
  (default: the devices of the generating run) and, for a finalize-only run on files moved from
  elsewhere, the measured wall time.
- ``xla_cpu_flags``: XLA CPU flags applied before JAX starts (CPU-only installs; see
  ``regift_jax.core.configs_util``).
"""

import ml_collections

from regift_jax.core import configs_util


def base_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "teacher": {"name": "", "model": "", "dtype": "bfloat16", "chat": False, "mesh": ""},
        "prompt": {"template": "teacher_extraction", "version": 0, "prefill": None},
        "data": {"squad_dir": "", "squad_file": "", "split": "pool", "num_buckets": 10,
                 "pool_buckets": 8, "max_questions": 0, "answerable_fraction": -1.0, "seed": 0},
        "decode": {"mode": "single", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0,
                   "max_new_tokens": 512, "max_reasoning_tokens": 512, "max_answer_tokens": 64,
                   "chunk": 64},
        "num_samples": 1,
        "batch_size": 64,
        "length_bucket": 128,
        "cache_len": 0,
        "out_dir": "data/traces",
        "progress": True,
        "distributed": "auto",
        "resume_override": False,
        "finalize_only": False,
        "hardware": "",
        "wall_time_s": 0.0,
        "xla_cpu_flags": configs_util.base_config().xla_cpu_flags,
    })
