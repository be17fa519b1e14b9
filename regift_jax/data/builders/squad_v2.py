"""TFDS builder for SQuAD 2.0: dev with a deterministic article-level pool/held-out split, and
train when its file is present.

Source (first that applies):

* ``SquadV2(source_dir=...)`` — a directory holding the official ``dev-v2.0.json`` (preferred) or
  the reconstructed ``dev-v2.0.reconstructed.json``, and optionally ``train-v2.0.json``; or a
  Hugging Face ``squad_v2`` dataset saved there with ``save_to_disk`` (``validation`` and, when
  saved, ``train``);
* ``$REGIFT_DATA_DIR/squad_v2`` or the repository's vendored ``data/squad_v2`` (the reconstructed
  dev file; same 35 articles / 11,873 questions, see ``data/squad_v2/README.md``);
* otherwise, or with ``SquadV2(download=True)``, the official :data:`SQUAD_V2_DEV_URL` (dev only).

Known files are checked (md5 of the official dev file, sha256 of the reconstructed one and of the
official train file, as TFDS's own ``squad`` checksums; ``verify_checksums=False`` skips).  The
official JSON schema is validated; a bad entry raises ``ValueError`` naming the file and the JSON
path (e.g. ``data[3].paragraphs[2].qas[5]``).

Splits (question order as in the file; ``disable_shuffling``):

* ``validation`` — all 11,873 dev questions;
* ``pool``       — dev questions of articles with ``int(sha256(title), 16) % num_buckets <
  pool_buckets`` (default 8 of 10);
* ``heldout``    — the other dev articles, for evaluation never seen in training;
* ``train``      — all train questions (130,319 in the official file; the paper's teacher source),
  only when the source has the train file.

Splitting whole articles keeps paragraphs of one article from landing on both sides.  With the
default 8/10 the dev set splits into 30 articles / 10,152 questions (85.5%) for ``pool`` and
5 articles / 1,721 questions for ``heldout`` (the fraction is by article hash, so the question
fraction is not exactly 80%).  ``num_buckets``/``pool_buckets`` are knobs of :class:`SquadV2Config`;
the file lookup and the split rule are :mod:`regift_jax.data.squad`'s (``find_squad_file``,
``select_split``), which trace generation and the trainer use too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from regift_jax.core.paths import default_source_dir, file_digest
from regift_jax.data.squad import (DEV_QUESTIONS, KNOWN_DIGESTS, OFFICIAL_DEV_FILE,
                                   RECONSTRUCTED_DEV_FILE, SQUAD_V2_DEV_URL, TRAIN_QUESTIONS,
                                   article_bucket, find_squad_file, hf_saved_splits,
                                   is_hf_dataset_dir, read_squad_v2, select_split)

logger = logging.getLogger(__name__)

_CITATION = """@inproceedings{rajpurkar-etal-2018-know,
  title = {Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}},
  author = {Rajpurkar, Pranav and Jia, Robin and Liang, Percy},
  booktitle = {Proceedings of ACL 2018 (Volume 2: Short Papers)},
  year = {2018}, pages = {784--789}}"""


@dataclasses.dataclass(eq=False)
class SquadV2Config(tfds.core.BuilderConfig):
    """Article split knobs: ``bucket(title) = int(sha256(title), 16) % num_buckets``;
    ``bucket < pool_buckets`` → ``pool``, else ``heldout``."""

    num_buckets: int = 10
    pool_buckets: int = 8

    def __post_init__(self):
        if not 0 < self.pool_buckets < self.num_buckets:
            raise ValueError(f"need 0 < pool_buckets ({self.pool_buckets}) < num_buckets "
                             f"({self.num_buckets})")


class SquadV2(tfds.core.GeneratorBasedBuilder):
    """SQuAD 2.0 → TFDS splits ``validation``, ``pool``, ``heldout`` (dev) and ``train``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "SQuAD 2.0 dev with an article-hash pool/heldout split.",
                     "1.1.0": "A train split when the source has the train file."}
    BUILDER_CONFIGS = [SquadV2Config(name="default", description="pool = article buckets 0-7 of "
                                     "10 (sha256 of the title), heldout = buckets 8-9.")]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, source_dir: Optional[str] = None, download: bool = False,
                 verify_checksums: bool = True, **kwargs):
        self._source_dir = source_dir
        self._download = download
        self._verify_checksums = verify_checksums
        super().__init__(**kwargs)
        # TFDS re-creates builders from this dict when unpickling (e.g. in worker processes).
        self._original_state.update(source_dir=source_dir, download=download,
                                    verify_checksums=verify_checksums)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        # {text: [str], answer_start: [int]} (parallel 1-D tensors; the usual TFDS SQuAD layout)
        span = tfds.features.FeaturesDict({
            "text": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "answer_start": tfds.features.Tensor(shape=(None,), dtype=np.int32)})
        return tfds.core.DatasetInfo(
            builder=self,
            description="SQuAD 2.0 dev set (answerable and unanswerable questions) with a "
                        "deterministic article-level pool/heldout split, and the train set "
                        "when present.",
            features=tfds.features.FeaturesDict({
                "id": text, "title": text, "context": text, "question": text,
                "answers": span, "plausible_answers": span,
                "is_impossible": np.bool_, "article_bucket": np.int32,
            }),
            homepage="https://rajpurkar.github.io/SQuAD-explorer/",
            citation=_CITATION,
            license="CC BY-SA 4.0",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _local_dir(self) -> Optional[str]:
        src = None if self._download else (self._source_dir or default_source_dir("squad_v2"))
        if src is not None and not os.path.isdir(src):
            raise FileNotFoundError(f"SQuAD-v2 source directory {src} does not exist")
        return src

    def _verify(self, path: str, name: str) -> dict:
        """Check a known file's digest; returns the metadata entries that record it."""
        if name not in KNOWN_DIGESTS:  # a Hugging Face directory: nothing published to check
            return {}
        algo, want = KNOWN_DIGESTS[name]
        got = file_digest(path, algo)
        if got != want:
            msg = f"{path}: {algo} {got} differs from the known {name} ({want})"
            if self._verify_checksums:
                raise ValueError(msg + "; pass verify_checksums=False to build it anyway")
            logger.warning("%s", msg)
        return {algo: got}

    def _read(self, path: str, name: str, which: str, expected: int) -> list:
        rows = read_squad_v2(path, which)
        if len(rows) != expected:
            logger.warning("%s (%s) has %d questions; the SQuAD 2.0 %s set has %d", path, name,
                           len(rows), which, expected)
        for r in rows:
            r["article_bucket"] = article_bucket(r["title"], self.builder_config.num_buckets)
        return rows

    def _train_source(self, src: Optional[str]) -> Optional[str]:
        if src is None:
            return None
        if is_hf_dataset_dir(src):  # a saved DatasetDict with a train split
            return src if "train" in (hf_saved_splits(src) or []) else None
        try:
            return find_squad_file(src, "train")
        except FileNotFoundError:
            return None

    def _split_generators(self, dl_manager):
        src = self._local_dir()
        if src is not None:
            path = find_squad_file(src)
            name, origin = os.path.basename(path), os.path.abspath(path)
        else:
            path = os.fspath(dl_manager.download(SQUAD_V2_DEV_URL))
            name, origin = OFFICIAL_DEV_FILE, SQUAD_V2_DEV_URL
        md = self.info.metadata
        md.update(self._verify(path, name))
        rows = self._read(path, name, "dev", DEV_QUESTIONS)
        cfg = self.builder_config
        pool = select_split(rows, "pool", cfg.num_buckets, cfg.pool_buckets)
        heldout = select_split(rows, "heldout", cfg.num_buckets, cfg.pool_buckets)
        md["source"] = origin
        md["source_file"] = name
        md["huggingface_dir"] = is_hf_dataset_dir(path)
        md["reconstructed"] = name == RECONSTRUCTED_DEV_FILE
        md["split_rule"] = (f"int(sha256(title), 16) % {cfg.num_buckets} < {cfg.pool_buckets} -> "
                            "pool, else heldout")
        md["pool_articles"] = sorted({r["title"] for r in pool})
        md["heldout_articles"] = sorted({r["title"] for r in heldout})
        splits = {"validation": self._generate_examples(rows),
                  "pool": self._generate_examples(pool),
                  "heldout": self._generate_examples(heldout)}
        train = self._train_source(src)
        if train is not None:
            tname = os.path.basename(train)
            md["train_source"] = os.path.abspath(train)
            md["train_checksum"] = self._verify(train, tname)
            splits["train"] = self._generate_examples(self._read(train, tname, "train",
                                                                 TRAIN_QUESTIONS))
        return splits

    def _generate_examples(self, rows):
        for r in rows:
            ex = dict(r)
            for k in ("answers", "plausible_answers"):
                ex[k] = {"text": [a["text"] for a in r[k]],
                         "answer_start": [a["answer_start"] for a in r[k]]}
            yield r["id"], ex
