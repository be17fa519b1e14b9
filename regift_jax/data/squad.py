"""SQuAD-v2 files without TensorFlow: the official JSON reader and the article-level split.

Used by the ``squad_v2`` TFDS builder (:mod:`regift_jax.data.builders.squad_v2`) and by trace
generation, which must run where TensorFlow is not installed (e.g. an accelerator machine).
"""

from __future__ import annotations

import hashlib
import json
import os

SQUAD_V2_DEV_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"
OFFICIAL_DEV_FILE = "dev-v2.0.json"
RECONSTRUCTED_DEV_FILE = "dev-v2.0.reconstructed.json"
# file name -> (algorithm, digest)
KNOWN_DIGESTS = {
    OFFICIAL_DEV_FILE: ("md5", "246adae8b7002f8679c027697b0b7cf8"),
    RECONSTRUCTED_DEV_FILE: ("sha256",
                             "72fb06181d94ff531e9dcb9e0cbb277bffcdde84521eee6c4f6f9d80c722641a"),
}
DEV_QUESTIONS = 11873


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


def read_squad_v2(path: str) -> list:
    """Flatten an official-schema SQuAD 2.0 JSON file into question dicts (file order)."""
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
    out, seen = [], {}
    for ai, art in enumerate(doc["data"]):
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
                wq = f"{wp}.qas[{qi}]"
                if not isinstance(qa, dict):
                    raise ValueError(f"{path}: {wq} must be an object")
                for k in ("id", "question"):
                    if not isinstance(qa.get(k), str):
                        raise ValueError(f"{path}: {wq}.{k} must be a string")
                if not isinstance(qa.get("is_impossible"), bool):
                    raise ValueError(f"{path}: {wq}.is_impossible missing or not a bool (is this "
                                     "SQuAD 1.1? SQuAD 2.0 is required)")
                if qa["id"] in seen:
                    raise ValueError(f"{path}: {wq}: duplicate question id {qa['id']} (first at "
                                     f"{seen[qa['id']]})")
                seen[qa["id"]] = wq
                answers = _answers(path, wq + ".answers", qa.get("answers"))
                if not qa["is_impossible"] and not answers:
                    raise ValueError(f"{path}: {wq}: answerable question without answers")
                out.append({
                    "id": qa["id"], "title": art["title"], "context": par["context"],
                    "question": qa["question"], "answers": answers,
                    "plausible_answers": _answers(path, wq + ".plausible_answers",
                                                  qa.get("plausible_answers"), allow_missing=True),
                    "is_impossible": qa["is_impossible"],
                })
    return out


SPLITS = ("validation", "pool", "heldout")


def find_squad_file(src: str) -> str:
    """The SQuAD-v2 dev file in directory ``src`` (official name first, then the reconstruction)."""
    for name in (OFFICIAL_DEV_FILE, RECONSTRUCTED_DEV_FILE):
        p = os.path.join(src, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"SQuAD-v2 source directory {src} has neither {OFFICIAL_DEV_FILE} nor "
                            f"{RECONSTRUCTED_DEV_FILE}; get {SQUAD_V2_DEV_URL} or build the "
                            "squad_v2 TFDS builder with download=True")


def select_split(rows: list, split: str, num_buckets: int = 10, pool_buckets: int = 8) -> list:
    """The article-level split: ``pool`` = buckets ``< pool_buckets``, ``heldout`` = the rest,
    ``validation`` = every row.  The one home of this rule (builder, trainer and generator)."""
    if split not in SPLITS:
        raise ValueError(f"SQuAD-v2 split {split!r}; valid: {', '.join(SPLITS)}")
    if split == "validation":
        return list(rows)
    return [r for r in rows
            if (article_bucket(r["title"], num_buckets) < pool_buckets) == (split == "pool")]


def load_split(src: str, split: str, num_buckets: int = 10, pool_buckets: int = 8) -> list:
    """Rows of one split read from the SQuAD-v2 file in directory ``src``."""
    return select_split(read_squad_v2(find_squad_file(src)), split, num_buckets, pool_buckets)
