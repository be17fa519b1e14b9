"""SQuAD-v2 sources without TensorFlow: the official dev/train JSON, a saved Hugging Face dataset
directory, and the one article-hash split rule (``regift_jax.data.squad``).

The train fixture (tests/fixtures/squad_train/README.md): 3 articles, 13 questions (4
unanswerable); pool 9, heldout 4.
"""

import json
import os
import shutil

import pytest

from regift_jax.data import squad

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_DIR = os.path.join(HERE, "fixtures", "squad_train")
TRAIN = os.path.join(TRAIN_DIR, "train-v2.0.json")
IDS = ["56be85543aeaaa14008c9001", "56be85543aeaaa14008c9002", "56be85543aeaaa14008c9003",
       "5a8d7bf7df8bba001a0f9001", "56be85543aeaaa14008c9004", "5a8d7bf7df8bba001a0f9002",
       "56be85543aeaaa14008c9005", "56be85543aeaaa14008c9006", "5a8d7bf7df8bba001a0f9003",
       "56be85543aeaaa14008c9007", "56be85543aeaaa14008c9008", "5a8d7bf7df8bba001a0f9004",
       "56be85543aeaaa14008c9009"]


def _raw():
    with open(TRAIN, encoding="utf-8") as f:
        return json.load(f)


def test_official_train_file_reads_in_order():
    rows = squad.read_squad_v2(TRAIN, "train")
    assert [r["id"] for r in rows] == IDS
    assert sum(r["is_impossible"] for r in rows) == 4
    r0 = rows[0]
    assert (r0["title"], r0["answers"]) == ("Marnholt_Observatory",
                                            [{"text": "1874", "answer_start": 38}])
    assert r0["context"][38:42] == "1874"
    imp = rows[3]
    assert imp["is_impossible"] and imp["answers"] == []
    assert imp["plausible_answers"][0]["text"] == "Agnes Calloway"


def test_train_split_and_article_buckets_of_the_train_file():
    assert squad.find_squad_file(TRAIN_DIR, "train") == TRAIN
    assert [r["id"] for r in squad.load_split(TRAIN_DIR, "train")] == IDS
    pool = squad.load_split("", "pool", squad_file=TRAIN)
    held = squad.load_split("", "heldout", squad_file=TRAIN)
    assert {r["title"] for r in pool} == {"Marnholt_Observatory", "Quellbrook_Canal"}
    assert {r["title"] for r in held} == {"Loddon_Beekeepers"}
    assert (len(pool), len(held)) == (9, 4)
    rows = squad.read_squad_v2(TRAIN)
    assert squad.select_split(rows, "train") == rows == squad.select_split(rows, "validation")
    with pytest.raises(FileNotFoundError, match=r"has no dev-v2\.0\.json or "
                                                r"dev-v2\.0\.reconstructed\.json"):
        squad.load_split(TRAIN_DIR, "pool")  # pool/heldout default to the dev file
    with pytest.raises(FileNotFoundError, match=r"has no train-v2\.0\.json; get https://"):
        squad.load_split(os.path.join(HERE, "..", "data", "squad_v2"), "train")
    with pytest.raises(ValueError, match="split 'test'; valid: validation, pool, heldout, train"):
        squad.load_split(TRAIN_DIR, "test")
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        squad.load_split(TRAIN_DIR, "train", squad_file=os.path.join(TRAIN_DIR, "nope.json"))


def test_bad_train_entries_name_the_json_path(tmp_path):
    doc = _raw()
    doc["data"][1]["paragraphs"][0]["qas"][2]["is_impossible"] = "yes"
    p = tmp_path / "train-v2.0.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[2\]\.is_impossible"):
        squad.read_squad_v2(str(p))
    p.write_bytes(b'{"data": [\xff]}')
    with pytest.raises(ValueError, match="invalid UTF-8 at byte 10"):
        squad.read_squad_v2(str(p))


def _hf_columns(rows):
    """The Hugging Face ``squad_v2`` columns of official rows (no is_impossible column)."""
    return {"id": [r["id"] for r in rows], "title": [r["title"] for r in rows],
            "context": [r["context"] for r in rows], "question": [r["question"] for r in rows],
            "answers": [{"text": [a["text"] for a in r["answers"]],
                         "answer_start": [a["answer_start"] for a in r["answers"]]}
                        for r in rows]}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny ``squad_v2`` saved with ``datasets``: a DatasetDict (train + validation) and a
    single Dataset."""
    datasets = pytest.importorskip("datasets")
    rows = squad.read_squad_v2(TRAIN)
    root = tmp_path_factory.mktemp("hf_squad")
    train = datasets.Dataset.from_dict(_hf_columns(rows))
    dev = datasets.Dataset.from_dict(_hf_columns(rows[:4]))
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(root / "dict"))
    train.save_to_disk(str(root / "single"))
    return str(root / "dict"), str(root / "single")


def _no_plausible(rows):
    return [dict(r, plausible_answers=[]) for r in rows]


def test_hf_dataset_dir_reads_like_the_official_file(hf_dirs):
    dict_dir, single_dir = hf_dirs
    official = _no_plausible(squad.read_squad_v2(TRAIN))
    assert squad.is_hf_dataset_dir(dict_dir) and squad.is_hf_dataset_dir(single_dir)
    assert not squad.is_hf_dataset_dir(TRAIN_DIR)
    assert squad.hf_saved_splits(dict_dir) == ["train", "validation"]
    assert squad.hf_saved_splits(single_dir) is None
    # a saved DatasetDict is a source directory for both sets
    assert squad.find_squad_file(dict_dir, "train") == dict_dir
    assert squad.load_split(dict_dir, "train") == official
    assert squad.load_split(dict_dir, "validation") == official[:4]
    assert squad.load_split(dict_dir, "pool") == squad.select_split(official[:4], "pool")
    # a single saved Dataset is whichever set it holds; pool/heldout split it
    assert squad.load_split("", "train", squad_file=single_dir) == official
    assert squad.load_split("", "heldout", squad_file=single_dir) == \
        squad.select_split(official, "heldout")


def test_hf_dataset_dir_errors_are_clear(hf_dirs, tmp_path):
    datasets = pytest.importorskip("datasets")
    dict_dir, _ = hf_dirs
    only_dev = tmp_path / "only_dev"
    shutil.copytree(dict_dir, only_dev)
    (only_dev / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    shutil.rmtree(only_dev / "train")
    with pytest.raises(ValueError, match=r"has splits \['validation'\]; SQuAD-v2 train needs "
                                         r"'train'"):
        squad.load_split(str(only_dev), "train")
    wrong = tmp_path / "wrong"
    datasets.Dataset.from_dict({"id": ["1"], "question": ["q"]}).save_to_disk(str(wrong))
    with pytest.raises(ValueError, match="missing column.* title, context, answers"):
        squad.read_squad_v2(str(wrong), "train")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{")
    with pytest.raises(ValueError, match="broken: not a readable Hugging Face dataset directory"):
        squad.read_squad_v2(str(broken), "train")
