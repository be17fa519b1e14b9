"""Command line: BBQ / StereoSet evaluation (:mod:`regift_jax.eval.evaluate`).

    python -m regift_jax.evaluate --model=DIR --mode=loglik|generate|stereoset --out=DIR
    python -m regift_jax.evaluate --generations=FILE --out=DIR
"""

import sys

from regift_jax.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
