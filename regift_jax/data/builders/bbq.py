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
(``verify_checksums=False`` to skip, e.g. for a patched copy).  Rows are read and validated by
the one BBQ reader, :func:`regift_jax.data.bbq.read_bbq_file` (evaluation reads the same way); a
bad row raises :class:`~regift_jax.data.bbq.BBQFormatError` (a ``ValueError``) naming
``file:line``.  Features keep all official fields:
``answer_info`` as nested ``{ans0, ans1, ans2}: [name, group]`` string lists and
``additional_metadata`` flattened into ``stereotyped_groups``, ``subcategory``, ``version``,
``source``.  The bias *target* (``target_loc`` of the official ``additional_metadata.csv``) is not a
field of the JSONL and is not produced here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from regift_jax.core.paths import file_digest
from regift_jax.data.bbq import (BBQ_CATEGORIES, BBQ_COMMIT, BBQ_URL, TEXT_FIELDS,  # noqa: F401
                                 BBQItem, available_categories, bbq_path,
                                 default_bbq_dir, read_bbq_file)

logger = logging.getLogger(__name__)

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


def to_example(item: BBQItem) -> dict:
    """The TFDS example of one BBQ row: its official fields, ``additional_metadata`` flattened."""
    return {"example_id": item.example_id, "label": item.label,
            **{k: getattr(item, k) for k in TEXT_FIELDS[:6]},
            **{f"ans{i}": item.options[i] for i in range(3)},
            "answer_info": {f"ans{i}": list(item.answer_info[i]) for i in range(3)},
            "stereotyped_groups": list(item.stereotyped_groups),
            "subcategory": item.subcategory, "version": item.version,
            "source": item.metadata_source}


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
                **{k: text for k in TEXT_FIELDS},
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
        src = None if self._download else (self._source_dir or default_bbq_dir())
        if src is not None:
            if not os.path.isdir(src):
                raise FileNotFoundError(f"BBQ source directory {src} does not exist")
            present = set(available_categories(src))
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
            paths = {c: bbq_path(src, c) for c in wanted}
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
            per_cat[cat] = [to_example(it) for it in read_bbq_file(path)]
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
