"""SQuAD-v2 files without TensorFlow: the official JSON reader, a local Hugging Face dataset reader
and the article-level split.

Sources (:func:`find_squad_file`): the official ``dev-v2.0.json`` / ``train-v2.0.json`` (the
vendored dev file is the reconstructed ``dev-v2.0.reconstructed.json``), or a Hugging Face
``squad_v2`` dataset saved to a local directory (``datasets.load_from_disk`` layout: a
``DatasetDict`` with ``train`` / ``validation`` or a single ``Dataset``).  Both give the same row
dicts, in file order.

Splits (:data:`SPLITS`): ``validation`` (every dev question), ``train`` (every train question) and
``pool`` / ``heldout``, the article-hash split of whichever file is read (the dev file unless a
file is named).  Used by the ``squad_v2`` TFDS builder
(:mod:`regift_jax.data.builders.squad_v2`), trace generation and the gold-answer baseline, which
must run where TensorFlow is not installed (e.g. an accelerator machine).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

SQUAD_V2_DEV_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"
SQUAD_V2_TRAIN_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v2.0.json"
OFFICIAL_DEV_FILE = "dev-v2.0.json"
OFFICIAL_TRAIN_FILE = "train-v2.0.json"
RECONSTRUCTED_DEV_FILE = "dev-v2.0.reconstructed.json"
# file name -> (algorithm, digest); the train digest is the one TFDS's squad checksums pin
KNOWN_DIGESTS = {
    OFFICIAL_DEV_FILE: ("md5", "246adae8b7002f8679c027697b0b7cf8"),
    RECONSTRUCTED_DEV_FILE: ("sha256",
                             "72fb06181d94ff531e9dcb9e0cbb277bffcdde84521eee6c4f6f9d80c722641a"),
    OFFICIAL_TRAIN_FILE: ("sha256",
                          "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002"),
}
DEV_QUESTIONS = 11873
TRAIN_QUESTIONS = 130319

# The two files of SQuAD 2.0: their names (preferred first) and their Hugging Face split names.
SETS = {"dev": (OFFICIAL_DEV_FILE, RECONSTRUCTED_DEV_FILE), "train": (OFFICIAL_TRAIN_FILE,)}
HF_SPLITS = {"dev": "validation", "train": "train"}
SET_URLS = {"dev": SQUAD_V2_DEV_URL, "train": SQUAD_V2_TRAIN_URL}
SPLITS = ("validation", "pool", "heldout", "train")
# Files of a ``save_to_disk`` directory: DatasetDict, or a single Dataset.
_HF_MARKERS = ("dataset_dict.json", "state.json")


def article_bucket(title: str, num_buckets: int = 10) -> int:
    """Deterministic bucket of an article title (sha256 of its UTF-8 bytes, mod ``num_buckets``)."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % num_buckets


def _answers(path, where, value, allow_missing=False):
    if value is None and allow_missing:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where} must be a list")
    out = []
    for i, a in enumerate(value):
        if (not isinstance(a, dict) or not isinstance(a.get("text"), str)
                or not isinstance(a.get("answer_start"), int)
                or isinstance(a["answer_start"], bool)):
            raise ValueError(f"{path}: {where}[{i}] must be {{text: str, answer_start: int}}")
        out.append({"text": a["text"], "answer_start": a["answer_start"]})
    return out


def _row(path: str, wq: str, title: str, context: str, qa, seen: dict) -> dict:
    """One question dict of the official schema, checked; ``wq`` names it in errors."""
    if not isinstance(qa, dict):
        raise ValueError(f"{path}: {wq} must be an object")
    for k in ("id", "question"):
        if not isinstance(qa.get(k), str):
            raise ValueError(f"{path}: {wq}.{k} must be a string")
    if not isinstance(qa.get("is_impossible"), bool):
        raise ValueError(f"{path}: {wq}.is_impossible missing or not a bool (is this SQuAD 1.1? "
                         "SQuAD 2.0 is required)")
    if qa["id"] in seen:
        raise ValueError(f"{path}: {wq}: duplicate question id {qa['id']} (first at "
                         f"{seen[qa['id']]})")
    seen[qa["id"]] = wq
    answers = _answers(path, wq + ".answers", qa.get("answers"))
    if not qa["is_impossible"] and not answers:
        raise ValueError(f"{path}: {wq}: answerable question without answers")
    return {"id": qa["id"], "title": title, "context": context, "question": qa["question"],
            "answers": answers,
            "plausible_answers": _answers(path, wq + ".plausible_answers",
                                          qa.get("plausible_answers"), allow_missing=True),
            "is_impossible": qa["is_impossible"]}


def _read_json_doc(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except ValueError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: not the SQuAD JSON schema (expected an object with a 'data' "
                         "list)")
    return doc


def read_squad_json(path: str) -> list:
    """Flatten an official-schema SQuAD 2.0 JSON file (dev or train) into question dicts."""
    out, seen = [], {}
    for ai, art in enumerate(_read_json_doc(path)["data"]):
        w = f"data[{ai}]"
        if not isinstance(art, dict) or not isinstance(art.get("title"), str) or not isinstance(
                art.get("paragraphs"), list):
            raise ValueError(f"{path}: {w} must have a string 'title' and a 'paragraphs' list")
        for pi, par in enumerate(art["paragraphs"]):
            wp = f"{w}.paragraphs[{pi}]"
            if not isinstance(par, dict) or not isinstance(par.get("context"), str) or \
                    not isinstance(par.get("qas"), list):
                raise ValueError(f"{path}: {wp} must have a string 'context' and a 'qas' list")
            for qi, qa in enumerate(par["qas"]):
                out.append(_row(path, f"{wp}.qas[{qi}]", art["title"], par["context"], qa, seen))
    return out


def is_hf_dataset_dir(path: str) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (DatasetDict or Dataset)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m))
                                       for m in _HF_MARKERS)


def hf_saved_splits(path: str) -> Optional[list]:
    """The split names of a saved ``DatasetDict`` (``None`` for a single saved ``Dataset``)."""
    try:
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f).get("splits")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}/dataset_dict.json: unreadable ({e})") from None
    return list(splits) if isinstance(splits, list) else []


def _hf_split(path: str, which: str):
    """The ``datasets.Dataset`` of set ``which`` (dev/train) saved in ``path``."""
    import datasets  # lazy: pulls in pandas/fsspec; only a Hugging Face source needs it

    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:  # FileNotFoundError, a bad arrow file, a bad state.json
        raise ValueError(f"{path}: not a readable Hugging Face dataset directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = HF_SPLITS[which]
        if name not in ds:
            raise ValueError(f"{path}: the saved DatasetDict has splits {sorted(ds)}; SQuAD-v2 "
                             f"{which} needs {name!r}")
        ds = ds[name]
    missing = [c for c in ("id", "title", "context", "question", "answers")
               if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: not the Hugging Face squad_v2 schema (missing column(s) "
                         f"{', '.join(missing)})")
    return ds


def read_squad_hf(path: str, which: str = "dev") -> list:
    """Question dicts of set ``which`` from a saved Hugging Face ``squad_v2`` dataset; an
    unanswerable question is one with no answer text (the dataset has no ``is_impossible``)."""
    out, seen = [], {}
    for i, ex in enumerate(_hf_split(path, which).to_list()):
        ans = ex["answers"]
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), list) or \
                len(ans["text"]) != len(ans.get("answer_start") or []):
            raise ValueError(f"{path}: row {i}.answers must be {{text: [str], answer_start: "
                             "[int]}} of equal length")
        qa = {"id": ex["id"], "question": ex["question"], "is_impossible": not ans["text"],
              "answers": [{"text": t, "answer_start": s}
                          for t, s in zip(ans["text"], ans["answer_start"])]}
        for k in ("title", "context"):
            if not isinstance(ex[k], str):
                raise ValueError(f"{path}: row {i}.{k} must be a string")
        out.append(_row(path, f"row {i}", ex["title"], ex["context"], qa, seen))
    return out


def read_squad_v2(path: str, which: str = "dev") -> list:
    """Question dicts from an official JSON file, or set ``which`` of a Hugging Face directory."""
    if os.path.isdir(path):
        return read_squad_hf(path, which)
    return read_squad_json(path)


def split_set(split: str) -> str:
    """The SQuAD 2.0 file a split is drawn from by default: ``train`` or ``dev``."""
    if split not in SPLITS:
        raise ValueError(f"SQuAD-v2 split {split!r}; valid: {', '.join(SPLITS)}")
    return "train" if split == "train" else "dev"


def find_squad_file(src: str, which: str = "dev") -> str:
    """The SQuAD-v2 ``which`` (dev/train) source in directory ``src``: its official file name
    first (dev: then the reconstruction), or ``src`` itself when it is a saved Hugging Face
    dataset."""
    if is_hf_dataset_dir(src):
        return src
    names = SETS[which]
    for name in names:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            return p
    hint = ("or build the squad_v2 TFDS builder with download=True" if which == "dev" else
            "or a directory saved with datasets' save_to_disk")
    raise FileNotFoundError(f"SQuAD-v2 source directory {src} has no {' or '.join(names)}; get "
                            f"{SET_URLS[which]} {hint}")


def select_split(rows: list, split: str, num_buckets: int = 10, pool_buckets: int = 8) -> list:
    """The article-level split: ``pool`` = buckets ``< pool_buckets``, ``heldout`` = the rest,
    ``validation`` / ``train`` = every row.  The one home of this rule (builder, trainer and
    generator)."""
    split_set(split)
    if split in ("validation", "train"):
        return list(rows)
    return [r for r in rows
            if (article_bucket(r["title"], num_buckets) < pool_buckets) == (split == "pool")]


def squad_source(src: str, split: str, squad_file: Optional[str] = None) -> str:
    """The file (or Hugging Face directory) a split is read from: ``squad_file`` when given,
    else the split's set looked up in ``src``."""
    which = split_set(split)
    if squad_file:
        if not os.path.exists(squad_file):
            raise FileNotFoundError(f"SQuAD-v2 file {squad_file} does not exist")
        return squad_file
    return find_squad_file(src, which)


def load_split(src: str, split: str, num_buckets: int = 10, pool_buckets: int = 8,
               squad_file: Optional[str] = None) -> list:
    """Rows of one split, read from :func:`squad_source` (``pool`` / ``heldout`` split whichever
    file that is)."""
    path = squad_source(src, split, squad_file)
    return select_split(read_squad_v2(path, split_set(split)), split, num_buckets, pool_buckets)
