"""Model content fingerprints (``regift_jax.models.fingerprint``): what a model is, cached."""

import hashlib
import json
import os

import pytest

from regift_jax.models import fingerprint as F
from regift_jax.models.checkpoints import CheckpointError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIFT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fingerprints"


def _hf_dir(path, name_or_path="org/Model-X"):
    os.makedirs(path)
    files = {"config.json": json.dumps({"_name_or_path": name_or_path, "hidden_size": 8}),
             "model.safetensors": "weights-1", "tokenizer.json": "{}", "README.md": "hello"}
    for fn, text in files.items():
        with open(os.path.join(path, fn), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(path, ".cache", "huggingface"))
    with open(os.path.join(path, ".cache", "huggingface", "x.json"), "w") as f:
        f.write("download bookkeeping")
    return str(path)


def test_gguf_fingerprint_is_the_sha256_of_the_file(tmp_path):
    p = tmp_path / "Tiny-Model.Q4_0.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    ident = F.describe_model(str(p))
    assert ident.fingerprint == "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    assert (ident.label, ident.kind, ident.path) == ("Tiny-Model.Q4_0.gguf", "gguf", str(p))
    assert F.model_fingerprint(str(p)) == ident.fingerprint


def test_hf_dir_fingerprint_covers_weights_config_and_tokenizer_only(tmp_path):
    d = _hf_dir(tmp_path / "m")
    ident = F.describe_model(d)
    assert (ident.label, ident.kind) == ("org/Model-X", "hf")
    first = ident.fingerprint
    with open(os.path.join(d, "README.md"), "w") as f:  # not a model file
        f.write("changed")
    assert F.model_fingerprint(d) == first
    with open(os.path.join(d, "model.safetensors"), "w") as f:  # same size, other weights
        f.write("weights-2")
    second = F.model_fingerprint(d)
    assert second != first
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001.safetensors"))
    assert F.model_fingerprint(d) not in (first, second)  # names count too
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    assert len({first, second, F.model_fingerprint(d)}) == 3
    # the label falls back to the directory name when the config names no repository
    assert F.describe_model(_hf_dir(tmp_path / "local-name", "/abs/train/out")).label == \
        "local-name"


def test_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch, cache):
    d = _hf_dir(tmp_path / "m")
    calls = []
    real = F.file_digest
    monkeypatch.setattr(F, "file_digest", lambda p: calls.append(p) or real(p))
    first = F.model_fingerprint(d)
    assert len(calls) == 3  # config.json, model.safetensors, tokenizer.json
    assert len(os.listdir(cache)) == 3
    assert F.model_fingerprint(d) == first and len(calls) == 3  # all from the cache
    w = os.path.join(d, "model.safetensors")
    with open(w, "w") as f:
        f.write("weights-2")
    os.utime(w, ns=(1, 1))  # an in-place change: another size/mtime key
    assert F.model_fingerprint(d) != first and calls[3:] == [w]
    for fn in os.listdir(cache):  # a corrupt entry is hashed again, never trusted
        (cache / fn).write_text("{")
    assert F.model_fingerprint(d) != first and len(calls) == 7


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("REGIFT_CACHE_DIR", str(blocker))
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    assert F.model_fingerprint(str(p)) == "sha256:" + hashlib.sha256(b"GGUF").hexdigest()


def test_presets_resolve_like_models_load(tmp_path, monkeypatch):
    models_dir = tmp_path / "models"
    d = _hf_dir(models_dir / "llama-3.2-1b")
    monkeypatch.setenv("REGIFT_MODELS_DIR", str(models_dir))
    assert F.describe_model("llama3.2-1b") == F.describe_model(d)
    with pytest.raises(CheckpointError, match="not available locally"):
        F.model_fingerprint("mistral-7b")
    with pytest.raises(CheckpointError, match="neither a file, a directory nor a preset"):
        F.model_fingerprint("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no files to fingerprint"):
        F.model_fingerprint(str(empty))


def test_the_offline_default_is_its_gguf_file():
    from regift_jax.models.tokenizer import smollm2_gguf_path
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ident = F.describe_model("smollm2-135m-instruct")
    assert (ident.kind, ident.path, ident.label) == ("gguf", path,
                                                     "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ident.fingerprint == "sha256:" + F.file_digest(path)
