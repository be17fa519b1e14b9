"""TFDS builder for BBQ (Bias Benchmark for QA; Parrish et al., Findings of ACL 2022).

Source: the official per-category JSONL files of github.com/nyu-mll/BBQ, pinned to commit
:data:`BBQ_COMMIT`.  Where they come from (first that applies):

* ``Bbq(source_dir=...)`` — a directory holding ``<Category>.jsonl`` files;
* ``$REGIFT_DATA_DIR/bbq`` or the repository's vendored ``data/bbq`` (6 of the 11 categories:
  Age, Disability_status, Nationality, Physical_appearance, Religion, Sexual_orientation);
* otherwise, or with ``Bbq(download=True)``, the official raw files at :data:`BBQ_URL`.

Configs: ``all`` (every official category file found in the directory — all 11 when
downloading) and one config per category (``age``, ``religion``, ``race_x_ses`` …).  There is
one split, ``test``.  Per-category access: build the category's config, or filter ``all`` on the
``category`` feature.  The original row order is kept (``disable_shuffling``).

Every file's SHA-256 is checked against the hash published for the pinned commit
(``verify_checksums=False`` to skip, e.g. for a patched copy); every row is validated and a bad
row raises ``ValueError`` naming ``file:line``.  Features keep all official fields:
``answer_info`` as nested ``{ans0, ans1, ans2}: [name, group]`` string lists and
``additional_metadata`` flattened into ``stereotyped_groups``, ``subcategory``, ``version``,
``source``.  The bias *target* (``target_loc`` of the official ``additional_metadata.csv``) is not a
field of the JSONL and is not produced here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from regift_jax.core.paths import default_source_dir, file_digest

logger = logging.getLogger(__name__)

BBQ_COMMIT = "bea11bd97d79217245b5871acd247b9d6eb24598"
BBQ_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/{commit}/data/{category}.jsonl"

# category -> (examples, sha256) of data/<category>.jsonl at BBQ_COMMIT.
BBQ_CATEGORIES = {
    "Age": (3680, "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60"),
    "Disability_status": (1556, "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f"),
    "Gender_identity": (5672, "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00"),
    "Nationality": (3080, "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090"),
    "Physical_appearance": (1576,
                            "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb"),
    "Race_ethnicity": (6880, "4a9f1214cfaa115ce7f0bdb40609122e431f5152c71b8ca64d665e483b946ae6"),
    "Race_x_SES": (11160, "af8e2ae3d0e5be9ebcbfe7149e591d47ff649e263307f4548f7fb12f6a6d83e8"),
    "Race_x_gender": (15960, "e5dbba782f8c4e25b99dd5470b5136e2db73dbf401cf6d4a5a3ed31b02f95696"),
    "Religion": (1200, "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616"),
    "SES": (6864, "9f92754bb037b0982604b9112705fb81d60a19d9e759c67e4a85e484a070f528"),
    "Sexual_orientation": (864, "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd"),
}

_TEXT_FIELDS = ("question_index", "question_polarity", "context_condition", "category", "context",
                "question", "ans0", "ans1", "ans2")
_CITATION = """@inproceedings{parrish-etal-2022-bbq,
  title = {{BBQ}: A hand-built bias benchmark for question answering},
  author = {Parrish, Alicia and Chen, Angelica and Nangia, Nikita and Padmakumar, Vishakh and
            Phang, Jason and Thompson, Jana and Htut, Phu Mon and Bowman, Samuel},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2022},
  year = {2022}, pages = {2086--2105}}"""


@dataclasses.dataclass(eq=False)
class BbqConfig(tfds.core.BuilderConfig):
    """``categories``: official category names to include; ``None`` = every one found."""

    categories: Optional[tuple] = None

    def __post_init__(self):
        if self.categories is not None:
            self.categories = tuple(self.categories)
            unknown = [c for c in self.categories if c not in BBQ_CATEGORIES]
            if unknown:
                raise ValueError(f"unknown BBQ categories {unknown}; known: {list(BBQ_CATEGORIES)}")


def _configs():
    cfgs = [BbqConfig(name="all", description="Every official BBQ category file found "
                      "(all 11 when downloading).")]
    for cat, (n, _) in BBQ_CATEGORIES.items():
        cfgs.append(BbqConfig(name=cat.lower(), categories=(cat,),
                              description=f"BBQ category {cat} ({n} examples)."))
    return cfgs


def _bad(path: str, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}")


def read_bbq_file(path: str) -> list:
    """Parse and validate one official BBQ JSONL file into flat example dicts (file order)."""
    rows, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                raise _bad(path, lineno, "blank line")
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _bad(path, lineno, f"invalid UTF-8 ({e.reason})") from None
            except ValueError as e:
                raise _bad(path, lineno, f"malformed JSON ({e})") from None
            if not isinstance(obj, dict):
                raise _bad(path, lineno, "not a JSON object")
            missing = [k for k in ("example_id", "label", "answer_info", "additional_metadata")
                       + _TEXT_FIELDS if k not in obj]
            if missing:
                raise _bad(path, lineno, f"missing field(s) {missing}")
            eid, label = obj["example_id"], obj["label"]
            if not isinstance(eid, int) or isinstance(eid, bool) or not 0 <= eid < 2**31:
                raise _bad(path, lineno, f"example_id must be a non-negative int32, got {eid!r}")
            if label not in (0, 1, 2) or isinstance(label, bool):
                raise _bad(path, lineno, f"label must be 0, 1 or 2, got {label!r}")
            if eid in seen:
                raise _bad(path, lineno, f"example_id {eid} already at line {seen[eid]}")
            seen[eid] = lineno
            row = {"example_id": eid, "label": label}
            for k in _TEXT_FIELDS:
                v = obj[k]
                if not isinstance(v, str):
                    raise _bad(path, lineno, f"{k} must be a string, got {type(v).__name__}")
                row[k] = v
            info = obj["answer_info"]
            if not isinstance(info, dict) or sorted(info) != ["ans0", "ans1", "ans2"]:
                raise _bad(path, lineno, "answer_info must be an object with keys ans0, ans1, ans2")
            row["answer_info"] = {}
            for k in ("ans0", "ans1", "ans2"):
                if not isinstance(info[k], list) or not all(isinstance(x, str) for x in info[k]):
                    raise _bad(path, lineno, f"answer_info.{k} must be a list of strings")
                row["answer_info"][k] = list(info[k])
            meta = obj["additional_metadata"]
            if not isinstance(meta, dict):
                raise _bad(path, lineno, "additional_metadata must be an object")
            groups = meta.get("stereotyped_groups", [])
            if not isinstance(groups, list) or not all(isinstance(x, str) for x in groups):
                raise _bad(path, lineno, "additional_metadata.stereotyped_groups must be a list of "
                           "strings")
            row["stereotyped_groups"] = list(groups)
            for k in ("subcategory", "version", "source"):
                v = meta.get(k, "")
                row[k] = v if isinstance(v, str) else json.dumps(v)
            rows.append(row)
    return rows


class Bbq(tfds.core.GeneratorBasedBuilder):
    """BBQ, official JSONL → TFDS (split ``test``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": f"Official BBQ data at commit {BBQ_COMMIT}."}
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "all"

    def __init__(self, *, source_dir: Optional[str] = None, download: bool = False,
                 verify_checksums: bool = True, **kwargs):
        self._source_dir = source_dir
        self._download = download
        self._verify = verify_checksums
        super().__init__(**kwargs)
        # TFDS re-creates builders from this dict when unpickling (e.g. in worker processes).
        self._original_state.update(source_dir=source_dir, download=download,
                                    verify_checksums=verify_checksums)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        strings = tfds.features.Tensor(shape=(None,), dtype=np.str_)  # 1-D list of strings
        return tfds.core.DatasetInfo(
            builder=self,
            description="BBQ: hand-built bias benchmark for question answering (3-way multiple "
                        "choice; ambiguous and disambiguated contexts).",
            features=tfds.features.FeaturesDict({
                "example_id": np.int32,
                **{k: text for k in _TEXT_FIELDS},
                "label": np.int32,
                "answer_info": tfds.features.FeaturesDict(
                    {k: strings for k in ("ans0", "ans1", "ans2")}),
                "stereotyped_groups": strings,
                "subcategory": text,
                "version": text,
                "source": text,
            }),
            homepage="https://github.com/nyu-mll/BBQ",
            citation=_CITATION,
            license="CC BY 4.0",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _wanted(self, available) -> list:
        cats = self.builder_config.categories
        if cats is None:
            return [c for c in BBQ_CATEGORIES if c in available]
        return list(cats)

    def _split_generators(self, dl_manager):
        src = None if self._download else (self._source_dir or default_source_dir("bbq"))
        if src is not None:
            if not os.path.isdir(src):
                raise FileNotFoundError(f"BBQ source directory {src} does not exist")
            present = {c for c in BBQ_CATEGORIES if os.path.isfile(os.path.join(src, f"{c}.jsonl"))}
            others = sorted(f for f in os.listdir(src) if f.endswith(".jsonl")
                            and f[:-len(".jsonl")] not in BBQ_CATEGORIES)
            if others:
                logger.warning("BBQ: ignoring non-official files in %s: %s", src, others)
            wanted = self._wanted(present)
            missing = [c for c in wanted if c not in present]
            if missing or not wanted:
                raise FileNotFoundError(
                    f"BBQ source directory {src} lacks {missing or 'every category file'}; get "
                    f"them from {BBQ_URL.format(commit=BBQ_COMMIT, category='<Category>')}, or "
                    f"build with download=True")
            paths = {c: os.path.join(src, f"{c}.jsonl") for c in wanted}
            origin = os.path.abspath(src)
        else:
            wanted = self._wanted(BBQ_CATEGORIES)
            urls = {c: BBQ_URL.format(commit=BBQ_COMMIT, category=c) for c in wanted}
            paths = {c: os.fspath(p) for c, p in dl_manager.download(urls).items()}
            origin = BBQ_URL.format(commit=BBQ_COMMIT, category="<Category>")
        # For 'all': official categories that are not in this build (a partial local copy).
        absent = ([c for c in BBQ_CATEGORIES if c not in paths]
                  if self.builder_config.categories is None else [])
        if absent:
            logger.warning("BBQ: %d of %d official categories not included: %s", len(absent),
                           len(BBQ_CATEGORIES), absent)

        per_cat, checks = {}, {}
        for cat, path in paths.items():
            digest = file_digest(path)
            ok = digest == BBQ_CATEGORIES[cat][1]
            checks[cat] = digest
            if not ok:
                msg = (f"{path}: sha256 {digest} differs from the official {cat}.jsonl at commit "
                       f"{BBQ_COMMIT} ({BBQ_CATEGORIES[cat][1]})")
                if self._verify:
                    raise ValueError(msg + "; pass verify_checksums=False to build it anyway")
                logger.warning("%s", msg)
            per_cat[cat] = read_bbq_file(path)
        md = self.info.metadata
        md["source"] = origin
        md["bbq_commit"] = BBQ_COMMIT
        md["categories"] = {c: len(r) for c, r in per_cat.items()}
        md["missing_categories"] = absent
        md["sha256"] = checks
        md["checksums_verified"] = bool(self._verify)
        return {"test": self._generate_examples(per_cat)}

    def _generate_examples(self, per_cat):
        for cat, rows in per_cat.items():
            for row in rows:
                yield f"{cat}-{row['example_id']}", row
