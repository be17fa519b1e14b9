"""TFDS builder for ReGiFT teacher traces (JSONL shards → TFDS split ``train``).

Source shards (see :mod:`regift_jax.data.records` for the record schema and the reading
policy): ``RegiftTraces(source=...)`` — a directory (its ``*.jsonl``), a glob, a file, or a list
of these; default ``$REGIFT_DATA_DIR/traces`` or the repository's ``data/traces/``.  There is no
download: traces are produced by ``python -m regift_jax.generate_traces``.  The trainer's default
source, ``data.source = "tfds:regift_traces/correct"``, is this builder
(:mod:`regift_jax.training.examples` builds it into a cache directory and reads it back in the
stored order, which is the shards' line order).

Every line goes through :func:`regift_jax.data.records.read_trace_jsonl`: unusable lines
(malformed JSON, schema errors, unparseable ``raw_generation`` tags, duplicates …) are dropped and
counted; the :class:`~regift_jax.data.records.ReadReport` is logged and stored in the dataset's
metadata (``builder.info.metadata["read_report"]``).  ``strict=True`` fails at the first bad
line instead, naming ``file:line``.

Configs select which traces are kept (``selection``) under a correctness ``criterion``:

==========================  ==========  ==========
config                      selection   criterion
==========================  ==========  ==========
``correct`` (default)       correct     lenient (``lenient_correct``, the paper's rule)
``incorrect``               incorrect   lenient
``all``                     all         —
``correct_strict_em``       correct     strict_em (``exact_match == 1``)
``incorrect_strict_em``     incorrect   strict_em
==========================  ==========  ==========

Other combinations: pass ``config=RegiftTracesConfig(name=..., selection=..., criterion=...)``.
Building is keyed by config name and version in ``data_dir``: prepare a different trace source
into a different ``data_dir`` (TFDS does not rebuild an existing dataset).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from regift_jax.core.paths import default_source_dir
from regift_jax.data import records as rec_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class RegiftTracesConfig(tfds.core.BuilderConfig):
    """``selection`` in ``correct|incorrect|all``; ``criterion`` in ``lenient|strict_em``;
    ``prefilled_think``: the teacher prompt ended with ``<think>`` (see
    ``parse_teacher_output``)."""

    selection: str = "correct"
    criterion: str = "lenient"
    prefilled_think: bool = True

    def __post_init__(self):
        if self.selection not in rec_lib.SELECTIONS:
            raise ValueError(f"selection {self.selection!r} not in {rec_lib.SELECTIONS}")
        if self.criterion not in rec_lib.CRITERIA:
            raise ValueError(f"criterion {self.criterion!r} not in {rec_lib.CRITERIA}")


def trace_features() -> tfds.features.FeaturesDict:
    """TFDS features of one trace (``extra`` is not stored)."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "id": text, "context": text, "question": text,
        "gold_answers": tfds.features.Tensor(shape=(None,), dtype=np.str_),
        "is_impossible": np.bool_,
        "teacher": text, "prompt_version": text,
        "decoding": tfds.features.FeaturesDict({
            "temperature": np.float32, "top_p": np.float32, "top_k": np.int32,
            "max_new_tokens": np.int32, "seed": np.int64,
        }),
        "sample_index": np.int32,
        "raw_generation": text, "reasoning": text, "answer": text,
        "exact_match": np.float32, "f1": np.float32, "lenient_correct": np.bool_,
        "reasoning_tokens": np.int32, "prompt_tokens": np.int32, "generated_tokens": np.int32,
    })


class RegiftTraces(tfds.core.GeneratorBasedBuilder):
    """Judged teacher traces → TFDS split ``train``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Trace schema of regift_jax.data.records."}
    BUILDER_CONFIGS = [
        RegiftTracesConfig(name="correct", selection="correct", criterion="lenient",
                           description="Traces judged correct (paper-lenient rule)."),
        RegiftTracesConfig(name="incorrect", selection="incorrect", criterion="lenient",
                           description="Parseable traces judged incorrect (paper-lenient rule)."),
        RegiftTracesConfig(name="all", selection="all", criterion="lenient",
                           description="Every parseable trace."),
        RegiftTracesConfig(name="correct_strict_em", selection="correct", criterion="strict_em",
                           description="Traces with SQuAD exact match 1."),
        RegiftTracesConfig(name="incorrect_strict_em", selection="incorrect",
                           criterion="strict_em", description="Traces with SQuAD exact match 0."),
    ]
    DEFAULT_CONFIG_NAME = "correct"

    def __init__(self, *, source: Union[None, str, os.PathLike, Sequence] = None,
                 strict: bool = False, **kwargs):
        self._source = source
        self._strict = strict
        super().__init__(**kwargs)
        # TFDS re-creates builders from this dict when unpickling (e.g. in worker processes).
        self._original_state.update(source=source, strict=strict)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ReGiFT reasoning traces: <think>R</think><answer>A</answer> teacher "
                        "outputs on SQuAD-v2 questions, with strict and lenient judgements.",
            features=trace_features(),
            homepage="https://arxiv.org/abs/2504.05632",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _resolve_source(self):
        if self._source is not None:
            return self._source
        src = default_source_dir("traces")
        if src is None:
            raise FileNotFoundError(
                "no trace shards: pass RegiftTraces(source=<dir|glob|files>) or put *.jsonl shards "
                "in data/traces/ (or $REGIFT_DATA_DIR/traces); generate them with "
                "regift_jax.generate_traces")
        return src

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        cfg = self.builder_config
        records, report = rec_lib.read_trace_jsonl(self._resolve_source(), strict=self._strict,
                                                   prefilled_think=cfg.prefilled_think)
        report.log(logger)
        selected = rec_lib.select_records(records, cfg.selection, cfg.criterion)
        logger.info("regift_traces/%s: %d of %d records selected (%s, %s)", cfg.name,
                    len(selected), len(records), cfg.selection, cfg.criterion)
        md = self.info.metadata
        md["read_report"] = report.to_dict()
        md["selection"] = cfg.selection
        md["criterion"] = cfg.criterion
        md["n_selected"] = len(selected)
        return {"train": self._generate_examples(selected)}

    def _generate_examples(self, records):
        for r in records:
            key = "/".join((r.teacher, r.prompt_version, r.id, str(r.sample_index)))
            yield key, r.to_dict()
