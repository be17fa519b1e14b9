"""Paths: the repository root and the one *data root* every reader of source data uses.

Source data (BBQ, SQuAD-v2, StereoSet, trace shards) is looked up in one *data root* with the
layout of the repository's top-level ``data/`` directory (``bbq/``, ``squad_v2/``,
``stereoset/``, ``traces/``):

1. an explicit directory passed to a builder (``source_dir=`` / ``source=``), else
2. the environment variable ``REGIFT_DATA_DIR`` (e.g. a complete local copy of BBQ with all 11
   categories under ``$REGIFT_DATA_DIR/bbq``); when it is set, a missing sub-directory is an error,
   never a silent fall-back, else
3. the vendored ``data/`` of a source checkout (the offline default), else
4. nothing: the BBQ and SQuAD-v2 builders then download the official files (see their modules).

Derived files that can be rebuilt (converted tokenizers, built TFDS datasets, model fingerprints)
live under one *cache root*: ``$REGIFT_CACHE_DIR`` if set, else ``~/.cache/regift_jax``
(:func:`cache_dir`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

DATA_DIR_ENV = "REGIFT_DATA_DIR"
CACHE_ENV_VAR = "REGIFT_CACHE_DIR"
# <repo>, the source checkout this package lives in (data/, configs/ and runs/ hang off it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# <repo>/data, present in a source checkout (not inside an installed wheel).
REPO_DATA_DIR = os.path.join(REPO_ROOT, "data")


def data_root() -> Optional[str]:
    """``$REGIFT_DATA_DIR`` if set (must exist), else the repo's ``data/`` if present, else None."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env} is not a directory")
        return env
    in_checkout = os.path.isfile(os.path.join(REPO_ROOT, "setup.py"))
    return REPO_DATA_DIR if in_checkout and os.path.isdir(REPO_DATA_DIR) else None


def default_source_dir(name: str) -> Optional[str]:
    """``<data root>/<name>`` or None when there is no data root.

    Raises ``FileNotFoundError`` when ``REGIFT_DATA_DIR`` is set but lacks ``<name>/``.
    """
    root = data_root()
    if root is None:
        return None
    path = os.path.join(root, name)
    if os.path.isdir(path):
        return path
    if os.environ.get(DATA_DIR_ENV):
        raise FileNotFoundError(
            f"{DATA_DIR_ENV}={root} has no '{name}/' sub-directory; create it (or symlink the "
            f"vendored {os.path.join(REPO_DATA_DIR, name)}), pass the directory explicitly, or "
            f"unset {DATA_DIR_ENV}")
    return None


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file (streamed)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(name: str = "") -> str:
    """``<cache root>/<name>``: ``$REGIFT_CACHE_DIR/<name>`` if that variable is set, else
    ``~/.cache/regift_jax/<name>`` (not created here)."""
    root = os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "regift_jax")
    return os.path.join(root, name) if name else root
