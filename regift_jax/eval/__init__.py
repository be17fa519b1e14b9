"""Evaluation stage: BBQ and StereoSet, from a config to reports.

``config`` (the ml_collections base config and the command line; no JAX) ->
``subset`` (balanced BBQ items, read by :mod:`regift_jax.data.bbq`) or ``generations`` (import
mode) -> ``tasks`` (a model answers: ``generate`` with the shared sampler, ``loglik`` scoring
engine, ``stereoset``) -> ``bbq`` (per-item judgements) -> ``report`` (``build_report`` with the
jitted ``scorer``; report.json / .md / .png) -> ``evaluate.run`` (one call for all of it; the
experiment and ``python -m regift_jax.evaluate`` use it).  ``harness`` adapts the same engines
to lm-eval.  A new evaluation task goes into ``tasks`` (and its data reader into ``data/``).
"""
