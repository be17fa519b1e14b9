"""Training stage: supervised fine-tuning of a student on teacher traces (or SQuAD gold answers).

In data-flow order:

* :mod:`~regift_jax.training.examples`: example dicts from the source (the ``regift_traces``
  TFDS builder by default, trace JSONL, SQuAD gold answers) and the held-out split;
* :mod:`~regift_jax.training.inputs`: prompt rendering and the streaming pipeline of batches;
* :mod:`~regift_jax.training.state`: the model, the LoRA/full split, the train state and its
  shardings, the final export;
* :mod:`~regift_jax.training.optim`: AdamW, the schedule and the weight-decay mask;
* :mod:`~regift_jax.training.step`: the loss and the jitted train / eval steps;
* :mod:`~regift_jax.training.checkpointing`: orbax checkpoints, resume, preemption;
* :mod:`~regift_jax.training.metrics`: MFU and the metrics writers;
* :mod:`~regift_jax.training.loop`: :func:`~regift_jax.training.loop.run`, the whole run
  (``python -m regift_jax.train`` is its command line).
"""
