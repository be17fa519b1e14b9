"""Command line: lm-evaluation-harness tasks on a regift_jax model (:mod:`regift_jax.eval.harness`).

    python -m regift_jax.lm_eval --model_args model=smollm2-135m-instruct --tasks bbq --limit 20
    python -m regift_jax.lm_eval --model_args model=runs/regift_smollm2/train --tasks bbq \\
        --samples '{"bbq": [0, 1, 2]}' --log_samples --output_path out/

The arguments are those of lm-eval's own ``lm-eval run`` (``--tasks``, ``--model_args``,
``--limit``, ``--samples``, ``--num_fewshot``, ``--batch_size``, ``--gen_kwargs``,
``--apply_chat_template``, ``--output_path``, ``--log_samples``, ``--include_path``, ...), parsed
by lm-eval itself, with three defaults of this backend: ``--model regift_jax``, ``--batch_size 8``
and the offline task definitions (``bbq`` and its variants over the vendored BBQ files) on the
task path ahead of any ``--include_path``.  ``--device`` is ignored: JAX uses its own devices.
Needs the ``lm_eval`` extra (``pip install -e '.[lm_eval]'``).
"""

import argparse
import sys
from typing import List, Optional

# lm-eval's own ``run`` sub-command (argument parser and executor; lm-eval is pinned).
from lm_eval._cli.run import Run
from lm_eval.utils import setup_logging

from regift_jax.eval import harness


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m regift_jax.lm_eval",
                                     description=__doc__.split("\n\n")[0])
    Run.create(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", *argv])
    if args.model is None and args.config is None:
        args.model = harness.MODEL_NAME
    if args.model == harness.MODEL_NAME and not hasattr(args, "batch_size"):
        args.batch_size = str(harness.DEFAULT_BATCH)
    # lm-eval's TaskManager takes a list of task directories; ours come first so a user's
    # --include_path can still override them.
    args.include_path = [harness.TASKS_DIR] + ([args.include_path] if args.include_path else [])
    return args


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.tasks:
        print("error: --tasks is required (e.g. --tasks bbq)", file=sys.stderr)
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
