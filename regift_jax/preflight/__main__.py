"""``python -m regift_jax.preflight``: :mod:`regift_jax.preflight.cli`."""

from regift_jax.preflight.cli import run_cli

if __name__ == "__main__":
    run_cli()
