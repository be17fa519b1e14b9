"""TFDS builders (bbq, squad_v2, regift_traces) built offline into a temporary data_dir.

Reference numbers: BBQ per-category counts from the official repository (and every
Sexual_orientation row compared field by field with the raw JSONL); SQuAD-v2 dev = 11,873
questions, with the pool/heldout rule recomputed here from the raw JSON; trace configs against
the fixture's documented counts (tests/fixtures/traces/README.md).

Timing: the two full builds (BBQ 11,956 rows; SQuAD-v2 3 splits, 23,746 rows) are TFDS's
per-example Python encoding, about 0.3-0.5 ms per row on one idle core.
"""

import collections
import hashlib
import json
import os
import pickle

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from regift_jax.data import builders as B  # noqa: E402
from regift_jax.core.paths import default_source_dir  # noqa: E402
from regift_jax.data import bbq as bbq_data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "data")
FIXTURE = os.path.join(HERE, "fixtures", "traces")
BBQ_COUNTS = {"Age": 3680, "Disability_status": 1556, "Nationality": 3080,
              "Physical_appearance": 1576, "Religion": 1200, "Sexual_orientation": 864}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No download, no GCS, no REGIFT_DATA_DIR from the caller's environment."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError(f"builder tried to download {args[1:]}")

    mp.setattr(tfds.download.DownloadManager, "download", refuse)
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)
    mp.delenv("REGIFT_DATA_DIR", raising=False)
    tfds.disable_progress_bar()
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def build(cls, data_dir, **kwargs):
    b = cls(data_dir=data_dir, **kwargs)
    b.download_and_prepare(download_config=B.offline_download_config())
    return b


def column(builder, split, key):
    ds = builder.as_dataset(split=split).map(lambda ex: ex[key])
    return [v.decode() if isinstance(v, bytes) else v for v in tfds.as_numpy(ds)]


class FakeDownloadManager:
    """Serves official URLs from local files, recording what was requested."""

    def __init__(self, mapping):
        self.mapping, self.requested = mapping, []

    class NotServed(Exception):
        pass

    def download(self, urls):
        single = not isinstance(urls, dict)
        urls = {"_": urls} if single else urls
        self.requested += list(urls.values())
        missing = [u for u in urls.values() if u not in self.mapping]
        if missing:
            raise self.NotServed(missing)
        out = {k: self.mapping[u] for k, u in urls.items()}
        return out["_"] if single else out


# ---------------------------------------------------------------- BBQ


def test_bbq_all_counts_per_category(tfds_dir):
    b = build(B.Bbq, tfds_dir, config="all")
    assert b.info.splits["test"].num_examples == sum(BBQ_COUNTS.values()) == 11956
    cats = collections.Counter(column(b, "test", "category"))
    assert cats == BBQ_COUNTS
    md = b.info.metadata
    assert md["categories"] == BBQ_COUNTS
    assert md["missing_categories"] == ["Gender_identity", "Race_ethnicity", "Race_x_SES",
                                        "Race_x_gender", "SES"]
    # reloading from disk keeps the metadata
    again = B.Bbq(data_dir=tfds_dir, config="all")
    assert again.info.metadata["bbq_commit"] == B.bbq.BBQ_COMMIT


def test_bbq_category_config_rows_equal_the_official_file(tfds_dir):
    b = build(B.Bbq, tfds_dir, config="sexual_orientation")
    got = list(tfds.as_numpy(b.as_dataset(split="test")))
    with open(os.path.join(DATA, "bbq", "Sexual_orientation.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(got) == len(raw) == 864
    assert b.info.metadata["categories"] == {"Sexual_orientation": 864}
    assert b.info.metadata["missing_categories"] == []
    dec = lambda v: v.decode()  # noqa: E731
    for g, r in zip(got, raw):  # file order is kept
        assert int(g["example_id"]) == r["example_id"] and int(g["label"]) == r["label"]
        for k in ("question_index", "question_polarity", "context_condition", "category",
                  "context", "question", "ans0", "ans1", "ans2"):
            assert dec(g[k]) == r[k], k
        for k in ("ans0", "ans1", "ans2"):
            assert [dec(x) for x in g["answer_info"][k]] == r["answer_info"][k]
        meta = r["additional_metadata"]
        assert [dec(x) for x in g["stereotyped_groups"]] == meta["stereotyped_groups"]
        assert (dec(g["subcategory"]), dec(g["version"]), dec(g["source"])) == (
            meta["subcategory"], meta["version"], meta["source"])


def test_bbq_download_path_uses_pinned_urls(tmp_path):
    url = B.bbq.BBQ_URL.format(commit=B.bbq.BBQ_COMMIT, category="Religion")
    assert url == ("https://raw.githubusercontent.com/nyu-mll/BBQ/"
                   "bea11bd97d79217245b5871acd247b9d6eb24598/data/Religion.jsonl")
    dl = FakeDownloadManager({url: os.path.join(DATA, "bbq", "Religion.jsonl")})
    b = B.Bbq(config="religion", data_dir=str(tmp_path), download=True)
    gens = b._split_generators(dl)
    assert dl.requested == [url]
    assert sum(1 for _ in gens["test"]) == 1200
    # 'all' asks for all 11 official files
    dl_all = FakeDownloadManager({})
    with pytest.raises(FakeDownloadManager.NotServed):  # only the request list matters here
        B.Bbq(config="all", data_dir=str(tmp_path), download=True)._split_generators(dl_all)
    assert dl_all.requested == [B.bbq.BBQ_URL.format(commit=B.bbq.BBQ_COMMIT, category=c)
                                for c in B.BBQ_CATEGORIES]
    assert len(B.BBQ_CATEGORIES) == 11


def test_bbq_checksum_and_row_errors(tmp_path):
    src = tmp_path / "bbq"
    src.mkdir()
    orig = open(os.path.join(DATA, "bbq", "Religion.jsonl"), "rb").read()
    (src / "Religion.jsonl").write_bytes(orig.replace(b"Muslim", b"Moslem", 1))
    b = B.Bbq(config="religion", data_dir=str(tmp_path / "out"), source_dir=str(src))
    with pytest.raises(ValueError, match="Religion.jsonl: sha256 .* differs"):
        b._split_generators(None)
    b = B.Bbq(config="religion", data_dir=str(tmp_path / "out"), source_dir=str(src),
              verify_checksums=False)
    assert sum(1 for _ in b._split_generators(None)["test"]) == 1200
    lines = orig.split(b"\n")
    lines[2] = lines[2][:40]
    (src / "Religion.jsonl").write_bytes(b"\n".join(lines))
    # the builder reads through the one BBQ reader (evaluation's too)
    assert B.bbq.read_bbq_file is bbq_data.read_bbq_file
    with pytest.raises(bbq_data.BBQFormatError, match=r"Religion\.jsonl:3: invalid JSON"):
        B.bbq.read_bbq_file(str(src / "Religion.jsonl"))
    # a category whose file is absent is a clear error
    b = B.Bbq(config="ses", data_dir=str(tmp_path / "out"), source_dir=os.path.join(DATA, "bbq"))
    with pytest.raises(FileNotFoundError, match=r"lacks \['SES'\].*raw.githubusercontent"):
        b._split_generators(None)


def test_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIFT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no 'bbq/' sub-directory"):
        default_source_dir("bbq")
    os.symlink(os.path.join(DATA, "bbq"), tmp_path / "bbq")
    assert default_source_dir("bbq") == str(tmp_path / "bbq")
    with pytest.raises(FileNotFoundError, match="has no 'traces/' sub-directory"):
        B.RegiftTraces(config="all", data_dir=str(tmp_path / "out"))._split_generators(None)
    (tmp_path / "traces").mkdir()
    with pytest.raises(FileNotFoundError,
                       match="no \\*.jsonl or \\*.jsonl.gz trace shards in directory"):
        B.RegiftTraces(config="all", data_dir=str(tmp_path / "out"))._split_generators(None)
    monkeypatch.delenv("REGIFT_DATA_DIR")
    assert default_source_dir("bbq") == os.path.join(DATA, "bbq")
    # no data root at all (e.g. an installed wheel): a clear message, not a stack trace
    monkeypatch.setattr(B.regift_traces, "default_source_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="no trace shards: pass RegiftTraces"):
        B.RegiftTraces(config="all", data_dir=str(tmp_path / "out"))._split_generators(None)


# ---------------------------------------------------------------- SQuAD-v2


def test_squad_v2_splits(tfds_dir):
    b = build(B.SquadV2, tfds_dir)
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    # independent recomputation of the documented rule from the raw JSON
    with open(os.path.join(DATA, "squad_v2", "dev-v2.0.reconstructed.json"), encoding="utf-8") as f:
        doc = json.load(f)
    per_title = {a["title"]: sum(len(p["qas"]) for p in a["paragraphs"]) for a in doc["data"]}
    pool_titles = {t for t in per_title
                   if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 < 8}
    n_pool = sum(n for t, n in per_title.items() if t in pool_titles)
    assert splits == {"validation": 11873, "pool": n_pool, "heldout": 11873 - n_pool}
    assert (len(pool_titles), n_pool) == (30, 10152)
    pool, held = set(column(b, "pool", "title")), set(column(b, "heldout", "title"))
    val = list(tfds.as_numpy(b.as_dataset(split="validation").map(
        lambda ex: (ex["id"], ex["is_impossible"]))))
    assert pool == pool_titles and held == set(per_title) - pool_titles and not pool & held
    assert sorted(b.info.metadata["heldout_articles"]) == sorted(held)
    # ids and answers of the validation split equal the raw file, in order
    ids = [i.decode() for i, _ in val]
    raw_ids = [q["id"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    assert ids == raw_ids
    first = next(iter(tfds.as_numpy(b.as_dataset(split="validation").take(1))))
    q0 = doc["data"][0]["paragraphs"][0]["qas"][0]
    assert [t.decode() for t in first["answers"]["text"]] == [a["text"] for a in q0["answers"]]
    assert list(first["answers"]["answer_start"]) == [a["answer_start"] for a in q0["answers"]]
    assert bool(first["is_impossible"]) is q0["is_impossible"]
    assert sum(bool(imp) for _, imp in val) == 5945


def test_squad_v2_download_path_checks_md5(tmp_path):
    local = os.path.join(DATA, "squad_v2", "dev-v2.0.reconstructed.json")
    dl = FakeDownloadManager({B.squad_v2.SQUAD_V2_DEV_URL: local})
    b = B.SquadV2(data_dir=str(tmp_path), download=True)
    with pytest.raises(ValueError, match="md5 .* differs from the known dev-v2.0.json"):
        b._split_generators(dl)
    assert dl.requested == ["https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"]
    b = B.SquadV2(data_dir=str(tmp_path), download=True, verify_checksums=False)
    gens = b._split_generators(dl)
    assert sum(1 for _ in gens["pool"]) + sum(1 for _ in gens["heldout"]) == 11873


def _small_source(tmp_path):
    """A source directory with a small dev file (the train fixture's rows) and the train fixture:
    known names, unknown digests."""
    train = os.path.join(HERE, "fixtures", "squad_train", "train-v2.0.json")
    src = tmp_path / "src"
    src.mkdir()
    with open(train, encoding="utf-8") as f:
        doc = json.load(f)
    doc["data"] = [doc["data"][0], doc["data"][2]]  # one pool and one heldout article
    (src / "dev-v2.0.json").write_text(json.dumps(doc))
    (src / "train-v2.0.json").write_bytes(open(train, "rb").read())
    return src


def test_squad_v2_train_split_when_the_train_file_is_present(tmp_path):
    src = _small_source(tmp_path)
    with pytest.raises(ValueError, match="md5 .* differs from the known dev-v2.0.json"):
        build(B.SquadV2, str(tmp_path / "a"), source_dir=str(src))
    b = build(B.SquadV2, str(tmp_path / "b"), source_dir=str(src), verify_checksums=False)
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    assert splits == {"validation": 10, "pool": 6, "heldout": 4, "train": 13}
    with open(src / "train-v2.0.json", encoding="utf-8") as f:
        raw_ids = [q["id"] for a in json.load(f)["data"] for p in a["paragraphs"]
                   for q in p["qas"]]
    assert column(b, "train", "id") == raw_ids
    assert b.info.metadata["train_source"] == str(src / "train-v2.0.json")
    assert list(b.info.metadata["train_checksum"]) == ["sha256"]
    imp = [r for r in tfds.as_numpy(b.as_dataset(split="train")) if r["is_impossible"]]
    assert len(imp) == 4 and all(len(r["answers"]["text"]) == 0 for r in imp)
    assert all(len(r["plausible_answers"]["text"]) == 1 for r in imp)
    # without the train file there is no train split
    os.remove(src / "train-v2.0.json")
    b = build(B.SquadV2, str(tmp_path / "c"), source_dir=str(src), verify_checksums=False)
    assert set(b.info.splits) == {"validation", "pool", "heldout"}


def test_squad_v2_from_a_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = B.squad_v2.read_squad_v2(os.path.join(HERE, "fixtures", "squad_train",
                                                 "train-v2.0.json"))

    def hf(rs):
        return datasets.Dataset.from_dict({
            "id": [r["id"] for r in rs], "title": [r["title"] for r in rs],
            "context": [r["context"] for r in rs], "question": [r["question"] for r in rs],
            "answers": [{"text": [a["text"] for a in r["answers"]],
                         "answer_start": [a["answer_start"] for a in r["answers"]]}
                        for r in rs]})

    src = tmp_path / "hf_squad_v2"
    dev = rows[:6] + rows[9:]  # one pool and one heldout article
    datasets.DatasetDict({"train": hf(rows), "validation": hf(dev)}).save_to_disk(str(src))
    b = build(B.SquadV2, str(tmp_path / "tfds"), source_dir=str(src))
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    assert splits == {"validation": 10, "pool": 6, "heldout": 4, "train": 13}
    assert b.info.metadata["huggingface_dir"] is True
    assert column(b, "train", "id") == [r["id"] for r in rows]


def test_squad_v1_file_is_rejected(tmp_path):
    p = tmp_path / "dev-v2.0.json"
    p.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": "c", "qas": [{"id": "1", "question": "q", "answers": []}]}]}]}))
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.is_impossible"):
        B.squad_v2.read_squad_v2(str(p))


# ---------------------------------------------------------------- traces


@pytest.mark.parametrize("config,expected", [
    ("correct", ["q1/0", "q1/1", "q2/0", "q3/1", "q4/0"]),
    ("incorrect", ["q2/1", "q3/0", "q5/0"]),
    ("all", ["q1/0", "q1/1", "q2/0", "q2/1", "q3/0", "q3/1", "q4/0", "q5/0"]),
    ("correct_strict_em", ["q1/0", "q2/0", "q3/1", "q4/0"]),
    ("incorrect_strict_em", ["q1/1", "q2/1", "q3/0", "q5/0"]),
])
def test_traces_configs(tfds_dir, config, expected):
    b = build(B.RegiftTraces, tfds_dir, config=config, source=FIXTURE)
    assert b.info.splits["train"].num_examples == len(expected)
    rows = list(tfds.as_numpy(b.as_dataset(split="train")))
    assert [f"{r['id'].decode()}/{r['sample_index']}" for r in rows] == expected
    rep = b.info.metadata["read_report"]
    assert (rep["n_lines"], rep["n_records"], rep["n_dropped"]) == (19, 8, 11)
    if config == "all":
        with open(os.path.join(FIXTURE, "shard-00000.jsonl"), encoding="utf-8") as f:
            raw = json.loads(f.readline())
        r = rows[0]
        assert r["raw_generation"].decode() == raw["raw_generation"]
        assert [g.decode() for g in r["gold_answers"]] == raw["gold_answers"]
        assert {k: r["decoding"][k].item() for k in raw["decoding"]} == raw["decoding"]
        assert (float(r["f1"]), bool(r["lenient_correct"]), int(r["prompt_tokens"])) == (
            raw["f1"], raw["lenient_correct"], raw["prompt_tokens"])


def test_traces_strict_build_fails_with_location(tmp_path):
    b = B.RegiftTraces(config="all", data_dir=str(tmp_path), source=FIXTURE, strict=True)
    clone = pickle.loads(pickle.dumps(b))  # builder options survive pickling
    assert (clone._source, clone._strict, clone.builder_config.name) == (FIXTURE, True, "all")
    with pytest.raises(ValueError, match=r"shard-00001\.jsonl:1: unknown_field"):
        b.download_and_prepare(download_config=B.offline_download_config())


def test_custom_traces_config_validation():
    with pytest.raises(ValueError, match="criterion"):
        B.RegiftTracesConfig(name="x", selection="correct", criterion="judge")
    with pytest.raises(ValueError, match="pool_buckets"):
        B.SquadV2Config(name="x", num_buckets=10, pool_buckets=10)
