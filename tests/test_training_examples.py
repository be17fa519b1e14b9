"""Training examples from the TFDS builder (the default ``data.source``) and from the JSONL shards
it is built from: the same examples in the same order, so the default run's numbers do not depend
on which source reads them.  Also: the source string's errors, the race-safe build, the
digest-keyed cache directory.

Independent reference: the JSONL path (``records.read_trace_jsonl`` + ``select_records``, the
reader every trace consumer uses); the TFDS path goes through ``tf.data`` and the builder's
tfrecord files instead.
"""

import os
import shutil

import pytest

pytest.importorskip("tensorflow_datasets")

from regift_jax.core import configs_util  # noqa: E402
from regift_jax.data import records as R  # noqa: E402
from regift_jax.training import examples  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_TRACES = os.path.join(REPO, "tests", "fixtures", "train", "traces")


def data_cfg(source, selection="correct", **over):
    d = configs_util.base_config().data
    d.source, d.selection = source, selection
    for k, v in over.items():
        d[k] = v
    return d


@pytest.fixture
def fixture_root(tmp_path, monkeypatch):
    """A data root whose traces/ are the trainer's fixture shards (192 records, 168 correct)."""
    root = tmp_path / "data_root"
    root.mkdir()
    shutil.copytree(FIXTURE_TRACES, root / "traces")
    monkeypatch.setenv("REGIFT_DATA_DIR", str(root))
    return root


@pytest.mark.parametrize("selection", ["correct", "incorrect", "all"])
def test_tfds_and_jsonl_sources_give_the_same_examples_in_order(fixture_root, tmp_path,
                                                               selection):
    tfds_dir = str(tmp_path / "tfds")
    via_tfds, s1 = examples.load_examples(data_cfg(f"tfds:regift_traces/{selection}", selection,
                                                   tfds_data_dir=tfds_dir))
    via_jsonl, s2 = examples.load_examples(data_cfg(str(fixture_root / "traces"), selection))
    assert via_tfds == via_jsonl  # same dicts, same order
    assert len(via_jsonl) == {"correct": 168, "incorrect": 24, "all": 192}[selection]
    assert [s1[k] for k in ("lines", "records", "dropped", "selected")] == \
        [s2[k] for k in ("lines", "records", "dropped", "selected")]
    assert s1["data_dir"].startswith(tfds_dir)
    # ... and so the held-out split and the max_examples prefix the trainer trains on
    a = examples.train_and_eval_examples(data_cfg(f"tfds:regift_traces/{selection}", selection,
                                                  tfds_data_dir=tfds_dir, max_examples=20))
    b = examples.train_and_eval_examples(data_cfg(str(fixture_root / "traces"), selection,
                                                  max_examples=20))
    assert a[:2] == b[:2] and len(a[0]) == 20


def test_the_shipped_trace_set_reads_the_same_from_both_sources():
    """The default run's data: data/traces through the default source and as JSONL."""
    if not os.path.isdir(os.path.join(REPO, "data", "traces")):
        pytest.skip("no data/traces in this checkout")
    default = configs_util.load_config_file(os.path.join(REPO, "configs", "llama.py")).data
    assert default.source == "tfds:regift_traces/correct"
    via_tfds, _ = examples.load_examples(default)
    recs, _ = R.read_trace_jsonl(os.path.join(REPO, "data", "traces"))
    want = [{k: getattr(r, k) for k in examples.FIELDS} for r in R.select_records(recs, "correct")]
    assert via_tfds == want and len(want) > 1000


def test_source_errors_name_the_key(fixture_root, tmp_path):
    with pytest.raises(ValueError, match="tfds:<builder>/<config> with builder in regift_traces"):
        examples.load_examples(data_cfg("tfds:bbq/religion"))
    with pytest.raises(ValueError, match="tfds:regift_traces"):
        examples.load_examples(data_cfg("tfds:regift_traces"))
    with pytest.raises(ValueError, match="unknown regift_traces config; valid: correct, "):
        examples.load_examples(data_cfg("tfds:regift_traces/nope"))
    d = data_cfg("tfds:regift_traces/correct", "incorrect", tfds_data_dir=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="selects correct traces .* data.selection='incorrect'"):
        examples.load_examples(d)
    with pytest.raises(FileNotFoundError, match="trace set not found"):
        examples.load_examples(data_cfg(str(tmp_path / "nowhere")))


def test_no_trace_shards_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("REGIFT_DATA_DIR", str(tmp_path / "root"))
    with pytest.raises(FileNotFoundError, match="traces"):
        examples.load_examples(data_cfg("tfds:regift_traces/correct",
                                        tfds_data_dir=str(tmp_path / "t")))


def test_a_build_that_loses_the_race_uses_the_winner(fixture_root, tmp_path, monkeypatch):
    """Two processes building at once: the second one's move finds the first one's dataset in
    place; it keeps that one and leaves no temporary directory behind."""
    from regift_jax.data.builders.regift_traces import RegiftTraces
    tfds_dir = str(tmp_path / "tfds")
    first = examples.prepare_regift_traces("correct", tfds_dir)
    monkeypatch.setattr(RegiftTraces, "is_prepared", lambda self: False)  # not built yet ...
    second = examples.prepare_regift_traces("correct", tfds_dir)  # ... so it builds and moves
    monkeypatch.undo()
    assert os.fspath(second.data_path) == os.fspath(first.data_path) and second.is_prepared()
    assert sorted(os.listdir(tfds_dir)) == ["regift_traces"]
    d = data_cfg("tfds:regift_traces/correct", tfds_data_dir=tfds_dir)
    assert len(examples.load_examples(d)[0]) == 168


def test_default_data_dir_follows_the_shard_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIFT_CACHE_DIR", str(tmp_path / "cache"))
    shard = tmp_path / "traces-p00000.jsonl"
    shutil.copy(os.path.join(FIXTURE_TRACES, "synthetic-00000.jsonl"), shard)
    a = examples.default_tfds_data_dir([str(shard)])
    assert a.startswith(str(tmp_path / "cache" / "tfds")) and \
        examples.default_tfds_data_dir([str(shard)]) == a
    with open(shard, "a") as f:
        f.write("\n")
    assert examples.default_tfds_data_dir([str(shard)]) != a
