"""TFDS builder for the SQuAD 2.0 dev set, with a deterministic article-level pool/held-out split.

Source (first that applies):

* ``SquadV2(source_dir=...)`` — a directory holding the official ``dev-v2.0.json`` (preferred) or
  the reconstructed ``dev-v2.0.reconstructed.json``;
* ``$REGIFT_DATA_DIR/squad_v2`` or the repository's vendored ``data/squad_v2`` (the reconstructed
  file; same 35 articles / 11,873 questions, see ``data/squad_v2/README.md``);
* otherwise, or with ``SquadV2(download=True)``, the official :data:`SQUAD_V2_DEV_URL`.

Known files are checked (md5 of the official file, sha256 of the reconstructed one;
``verify_checksums=False`` skips).  The official JSON schema is validated; a bad entry raises
``ValueError`` naming the file and the JSON path (e.g. ``data[3].paragraphs[2].qas[5]``).

Splits (question order as in the file; ``disable_shuffling``):

* ``validation`` — all 11,873 dev questions;
* ``pool``       — questions of articles with ``int(sha256(title), 16) % num_buckets <
  pool_buckets`` (default 8 of 10), the pool the teacher generates traces from;
* ``heldout``    — the other articles, for evaluation never seen in training.

Splitting whole articles keeps paragraphs of one article from landing on both sides.  With the
default 8/10 the dev set splits into 30 articles / 10,152 questions (85.5%) for ``pool`` and
5 articles / 1,721 questions for ``heldout`` (the fraction is by article hash, so the question
fraction is not exactly 80%).  ``num_buckets``/``pool_buckets`` are knobs of :class:`SquadV2Config`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from regift_jax.core.paths import default_source_dir, file_digest

logger = logging.getLogger(__name__)

from regift_jax.data.squad import (  # noqa: F401  (re-exported)
    DEV_QUESTIONS, KNOWN_DIGESTS, OFFICIAL_DEV_FILE, RECONSTRUCTED_DEV_FILE, SQUAD_V2_DEV_URL,
    article_bucket, read_squad_v2)

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


def _find_local(src: str) -> str:
    for name in (OFFICIAL_DEV_FILE, RECONSTRUCTED_DEV_FILE):
        p = os.path.join(src, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"SQuAD-v2 source directory {src} has neither {OFFICIAL_DEV_FILE} nor "
                            f"{RECONSTRUCTED_DEV_FILE}; get {SQUAD_V2_DEV_URL} or build with "
                            "download=True")


class SquadV2(tfds.core.GeneratorBasedBuilder):
    """SQuAD 2.0 dev → TFDS splits ``validation``, ``pool``, ``heldout``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SQuAD 2.0 dev with an article-hash pool/heldout split."}
    BUILDER_CONFIGS = [SquadV2Config(name="default", description="pool = article buckets 0-7 of "
                                     "10 (sha256 of the title), heldout = buckets 8-9.")]
    DEFAULT_CONFIG_NAME = "default"

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
        # {text: [str], answer_start: [int]} (parallel 1-D tensors; the usual TFDS SQuAD layout)
        span = tfds.features.FeaturesDict({
            "text": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            "answer_start": tfds.features.Tensor(shape=(None,), dtype=np.int32)})
        return tfds.core.DatasetInfo(
            builder=self,
            description="SQuAD 2.0 dev set (answerable and unanswerable questions) with a "
                        "deterministic article-level pool/heldout split.",
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

    def _split_generators(self, dl_manager):
        src = None if self._download else (self._source_dir or default_source_dir("squad_v2"))
        if src is not None:
            if not os.path.isdir(src):
                raise FileNotFoundError(f"SQuAD-v2 source directory {src} does not exist")
            path = _find_local(src)
            name, origin = os.path.basename(path), os.path.abspath(path)
        else:
            path = os.fspath(dl_manager.download(SQUAD_V2_DEV_URL))
            name, origin = OFFICIAL_DEV_FILE, SQUAD_V2_DEV_URL
        algo, want = KNOWN_DIGESTS[name]
        got = file_digest(path, algo)
        if got != want:
            msg = f"{path}: {algo} {got} differs from the known {name} ({want})"
            if self._verify:
                raise ValueError(msg + "; pass verify_checksums=False to build it anyway")
            logger.warning("%s", msg)
        rows = read_squad_v2(path)
        if len(rows) != DEV_QUESTIONS:
            logger.warning("%s has %d questions; the SQuAD 2.0 dev set has %d", path, len(rows),
                           DEV_QUESTIONS)
        cfg = self.builder_config
        for r in rows:
            r["article_bucket"] = article_bucket(r["title"], cfg.num_buckets)
        pool = [r for r in rows if r["article_bucket"] < cfg.pool_buckets]
        heldout = [r for r in rows if r["article_bucket"] >= cfg.pool_buckets]
        md = self.info.metadata
        md["source"] = origin
        md["source_file"] = name
        md["reconstructed"] = name == RECONSTRUCTED_DEV_FILE
        md[algo] = got
        md["split_rule"] = (f"int(sha256(title), 16) % {cfg.num_buckets} < {cfg.pool_buckets} -> "
                            "pool, else heldout")
        md["pool_articles"] = sorted({r["title"] for r in pool})
        md["heldout_articles"] = sorted({r["title"] for r in heldout})
        return {
            "validation": self._generate_examples(rows),
            "pool": self._generate_examples(pool),
            "heldout": self._generate_examples(heldout),
        }

    def _generate_examples(self, rows):
        for r in rows:
            ex = dict(r)
            for k in ("answers", "plausible_answers"):
                ex[k] = {"text": [a["text"] for a in r[k]],
                         "answer_start": [a["answer_start"] for a in r[k]]}
            yield r["id"], ex
