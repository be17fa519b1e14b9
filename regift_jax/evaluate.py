"""Command line: BBQ / StereoSet evaluation (:mod:`regift_jax.eval.evaluate`).

    python -m regift_jax.evaluate --model=DIR --mode=loglik|generate|stereoset --out=DIR
    python -m regift_jax.evaluate --generations=FILE --category=Religion --out=DIR
    python -m regift_jax.evaluate --config=configs/eval.py:generate --model=DIR --out=DIR \\
        --config.generate.max_new_tokens=128

Flags -> the evaluation config (:func:`regift_jax.eval.config.from_argv`: ``--config=FILE[:ARG]``,
the flag aliases, ``--config.KEY=VALUE``) -> :func:`regift_jax.eval.evaluate.run_cli`.  Exit
status 0, or 2 with a one-line error for bad input or an output that cannot be written.

Several hosts: start the same command on every process with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (as for training; or ``--config.distributed.*``;
a TPU pod is detected): each process scores its share of the items, process 0 writes the report.
"""

import sys
from typing import Optional, Sequence

from regift_jax.core import configs_util
from regift_jax.eval import config as eval_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = eval_config.from_argv(sys.argv[1:] if argv is None else argv)
    except eval_config.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs_util.apply_cli_xla_cpu_flags(cfg.xla_cpu_flags)
    # lazy: JAX starts with this import, after the XLA flags above are in the environment.
    from regift_jax.eval import evaluate
    return evaluate.run_cli(cfg)


if __name__ == "__main__":
    sys.exit(main())
