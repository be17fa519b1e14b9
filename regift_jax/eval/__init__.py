"""Evaluation stage: BBQ and StereoSet, from a config to reports.

``config`` (the ml_collections base config and the command line; no JAX) ->
``subset`` (balanced BBQ items, read by :mod:`regift_jax.data.bbq`; their context groups) or
``generations`` (import mode) -> ``tasks`` (a model answers: ``generate`` with the shared sampler,
``loglik`` scoring engine, ``stereoset``; each process of a multi-host run takes its share,
``hosts``) -> ``bbq`` (per-item judgements) -> ``report`` (``build_report`` with the jitted
``scorer`` and its context-group bootstrap; report.json / .md / .png) and ``compare`` (the paired
before/after test) -> ``evaluate.run`` (one call for all of it; the experiment and ``python -m
regift_jax.evaluate`` use it).  ``harness`` adapts the same engines to lm-eval.  A new
evaluation task goes into ``tasks`` (and its data reader into ``data/``).
"""
