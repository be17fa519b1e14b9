"""Content fingerprints: what a model (or a data file) *is*, independent of where it lies.

``model_fingerprint(name_or_path)`` is ``sha256:<hex>`` of

* a ``.gguf`` file: the file's bytes;
* a Hugging Face directory: its weight, config and tokenizer files (:data:`MODEL_FILE_PATTERNS`),
  as the sorted lines ``<relative name>\\t<sha256 of the file>`` — so a renamed, added, removed or
  changed file changes it, a README or a download cache beside them does not.

A preset name resolves to its local file or directory as :func:`regift_jax.models.load` does
(never downloading).  :func:`describe_model` adds a human-readable label derived from the model
itself (the GGUF file name, or the HF config's ``_name_or_path``, else the directory name).

Hashing a 65 GB checkpoint takes minutes, so each file's digest is cached under the user cache
directory (``$REGIFT_CACHE_DIR/fingerprints`` or ``~/.cache/regift_jax/fingerprints``), keyed by
its absolute path, size and modification time: a file that changes in place is hashed again.  An
unwritable cache only costs the time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from typing import Callable, Optional

from regift_jax.core import paths
from regift_jax.core.io import atomic_write_json
from regift_jax.core.paths import file_digest
from regift_jax.models import _resolve
from regift_jax.models.checkpoints import CheckpointError

# The files of a Hugging Face model directory that decide what it computes.
MODEL_FILE_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt",
                       "vocab.txt", "*.gguf")


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """A model as trace generation records it."""
    label: str  # derived from the model, e.g. "SmolLM2-135M-Instruct.Q4_1.gguf"
    fingerprint: str  # "sha256:<hex>"
    kind: str  # "gguf" | "hf"
    path: str  # the resolved local file or directory


def cache_dir() -> str:
    return paths.cache_dir("fingerprints")


def _cached_sha256(path: str) -> str:
    """sha256 of one file, read from / written to the cache keyed by path, size and mtime."""
    st = os.stat(path)
    key = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = os.path.join(cache_dir(), hashlib.sha256(
        json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    try:
        with open(entry, encoding="utf-8") as f:
            got = json.load(f)
        if isinstance(got, dict) and {k: got.get(k) for k in key} == key and \
                isinstance(got.get("sha256"), str):
            return got["sha256"]
    except (OSError, ValueError):
        pass  # no entry yet, or an unreadable one: hash again
    digest = file_digest(path)
    try:
        atomic_write_json(entry, dict(key, sha256=digest))
    except OSError:
        pass  # a read-only cache only costs the time
    return digest


def _is_model_file(rel: str) -> bool:
    return any(fnmatch.fnmatch(os.path.basename(rel), p) for p in MODEL_FILE_PATTERNS)


def path_digest(path: str, include: Optional[Callable[[str], bool]] = None) -> str:
    """``sha256:<hex>`` of a file, or of a directory's files (recursive, hidden entries skipped,
    ``include(relative name)`` selects) as names plus contents."""
    if os.path.isfile(path):
        return "sha256:" + _cached_sha256(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory to fingerprint")
    lines = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), path).replace(os.sep, "/")
            if not fn.startswith(".") and (include is None or include(rel)):
                lines.append(f"{rel}\t{_cached_sha256(os.path.join(dirpath, fn))}\n")
    if not lines:
        raise FileNotFoundError(f"{path}: no files to fingerprint")
    return "sha256:" + hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def _hf_label(path: str) -> str:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            name = json.load(f).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None  # the weights' own loader reports a bad config.json
    if isinstance(name, str) and name.strip() and not os.path.isabs(name):
        return name.strip()
    return os.path.basename(os.path.normpath(path))


def describe_model(name_or_path: str) -> ModelIdentity:
    """Label and fingerprint of a preset name, HF directory or ``.gguf`` file (no download)."""
    try:
        kind, path, _ = _resolve(name_or_path, download=False)
    except FileNotFoundError as e:  # the offline default's package is not installed
        raise CheckpointError(str(e)) from None
    if kind == "gguf":
        return ModelIdentity(os.path.basename(path), path_digest(path), kind, path)
    return ModelIdentity(_hf_label(path), path_digest(path, _is_model_file), kind, path)


def model_fingerprint(name_or_path: str) -> str:
    """``sha256:<hex>`` of the model's content (see the module docstring)."""
    return describe_model(name_or_path).fingerprint
