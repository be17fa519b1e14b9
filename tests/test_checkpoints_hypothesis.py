"""Property-based tests of the checkpoint readers against random corruptions.

A tiny HF checkpoint (``config.json`` + ``model.safetensors``, and a sharded copy with
``model.safetensors.index.json``) is corrupted in one way: any file truncated at any byte, one
byte replaced by any value, a safetensors header length set to any 64-bit value, one header
entry field / config key / index entry replaced by any JSON value (wrong types, huge numbers,
NaN, deep nesting), or a whole file replaced by a hostile blob.  The properties:

* loading raises nothing but the project's own errors (``CheckpointError``,
  ``UnsupportedArchitectureError``), and a ``CheckpointError`` names the file it is about;
* a truncated file never loads;
* an untouched checkpoint loads to exactly the saved parameters.

Examples are bounded and derandomized (the same examples on every run); no torch needed.
"""

import atexit
import json
import os
import shutil
import struct
import tempfile

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regift_jax.models import checkpoints as ck
from regift_jax.models.config import ModelConfig, UnsupportedArchitectureError
from regift_jax.models.decoder import init_params

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
CFG = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, bos_token_id=1, eos_token_id=2)
TMP = tempfile.mkdtemp(prefix="regift_ckpt_")
atexit.register(shutil.rmtree, TMP, True)  # also when this module is collected but not run
SINGLE, SHARDED = os.path.join(TMP, "single"), os.path.join(TMP, "sharded")
PARAMS = init_params(CFG)
ck.export_hf(SINGLE, CFG, PARAMS)
ck.export_hf(SHARDED, CFG, PARAMS, max_shard_bytes=600)
SHARDS = sorted(f for f in os.listdir(SHARDED) if f.endswith(".safetensors"))
assert len(SHARDS) > 1 and os.path.exists(os.path.join(SHARDED, "model.safetensors.index.json"))
FILES = {"single": ["config.json", "model.safetensors"],
         "sharded": ["config.json", "model.safetensors.index.json"] + SHARDS}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8)
BLOBS = [b"", b"[]", b"{}", b"null", b"[" * 100000, b"\x00" * 8, b"\xff" * 8 + b"{}",
         struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 2 ** 63) + b"{}", b"GGUF" + bytes(64)]


def _copy(kind: str) -> str:
    d = tempfile.mkdtemp(dir=TMP)
    shutil.rmtree(d)
    shutil.copytree(SINGLE if kind == "single" else SHARDED, d)
    return d


def _load(d: str):
    """Load ``d``; only the project's errors may escape, a CheckpointError naming a file of
    ``d``.  Returns the params, or None after an error."""
    try:
        return ck.load_hf(d)[1]
    except UnsupportedArchitectureError:
        return None
    except ck.CheckpointError as e:
        assert d in str(e), str(e)
        return None


def _edit_json(path: str, edit):
    with open(path, "rb") as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _st_header(path: str):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(path: str, header, rest: bytes):
    hb = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + rest)


def test_untouched_checkpoints_load_exactly():
    for d in (SINGLE, SHARDED):
        got = _load(_copy(os.path.basename(d)))
        assert got is not None
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            PARAMS, got)
        assert all(jax.tree.leaves(same))


file_choice = st.sampled_from(["single", "sharded"]).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(FILES[k])))


@SETTINGS
@given(file_choice, st.floats(0, 1, exclude_max=True))
def test_truncation_at_any_byte(choice, frac):
    kind, name = choice
    d = _copy(kind)
    path = os.path.join(d, name)
    with open(path, "rb") as f:
        data = f.read()
    cut = int(frac * len(data.rstrip()))  # a JSON file's trailing newline is not content
    with open(path, "wb") as f:
        f.write(data[:cut])
    assert _load(d) is None


@SETTINGS
@given(file_choice, st.floats(0, 1, exclude_max=True), st.integers(0, 255))
def test_one_byte_replaced(choice, frac, value):
    kind, name = choice
    d = _copy(kind)
    path = os.path.join(d, name)
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(int(frac * len(data)))
        f.write(bytes([value]))
    _load(d)


@SETTINGS
@given(st.sampled_from(["single", "sharded"]), st.integers(0, 2 ** 64 - 1))
def test_any_safetensors_header_length(kind, n):
    d = _copy(kind)
    path = os.path.join(d, FILES[kind][-1])
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", n))
    _load(d)


@SETTINGS
@given(st.sampled_from(["single", "sharded"]), st.integers(0, 40),
       st.sampled_from(["dtype", "shape", "data_offsets", None]), json_values)
def test_safetensors_header_entry_of_any_json(kind, which, field, value):
    d = _copy(kind)
    path = os.path.join(d, FILES[kind][-1])
    header, rest = _st_header(path)
    name = sorted(header)[which % len(header)]
    if field is None:
        header[name] = value
    else:
        header[name][field] = value
    _write_st(path, header, rest)
    _load(d)


@SETTINGS
@given(st.sampled_from(sorted(ck._HF_KEYS) + ["model_type", "unknown_key"]),
       json_values | st.sampled_from([2 ** 64, -1, 0, 10 ** 9, float("nan"), float("inf")]))
def test_config_key_of_any_json(key, value):
    d = _copy("single")
    _edit_json(os.path.join(d, "config.json"), lambda doc: doc.__setitem__(key, value))
    _load(d)


@SETTINGS
@given(st.integers(0, 40), json_values | st.sampled_from(
    ["/etc/passwd", "../single/model.safetensors", "a/../../x", SHARDS[0] + "/", "."]))
def test_index_entry_of_any_json(which, value):
    d = _copy("sharded")

    def edit(doc):
        wm = doc["weight_map"]
        wm[sorted(wm)[which % len(wm)]] = value
    _edit_json(os.path.join(d, "model.safetensors.index.json"), edit)
    assert _load(d) is None or isinstance(value, str)


@SETTINGS
@given(file_choice, st.sampled_from(BLOBS) | json_values.map(lambda v: json.dumps(v).encode()))
def test_whole_file_replaced(choice, blob):
    kind, name = choice
    d = _copy(kind)
    with open(os.path.join(d, name), "wb") as f:
        f.write(blob)
    assert _load(d) is None

