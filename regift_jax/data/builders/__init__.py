"""TFDS dataset builders: ``bbq``, ``squad_v2``, ``regift_traces``.

Importing this package registers the three builders with TFDS (so ``tfds.builder("bbq")`` works).
They build offline from local files (the vendored ``data/`` by default; see
:mod:`regift_jax.data`), and BBQ/SQuAD-v2 fall back to the official URLs when no local copy
exists.  Typical use::

    import tensorflow_datasets as tfds
    from regift_jax.data.builders import Bbq, SquadV2, RegiftTraces, offline_download_config

    b = Bbq(config="religion", data_dir="/tmp/tfds")
    b.download_and_prepare(download_config=offline_download_config())
    ds = b.as_dataset(split="test")

    t = RegiftTraces(config="correct", source="data/traces", data_dir="/tmp/tfds")
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from regift_jax.data.builders.bbq import BBQ_CATEGORIES, Bbq, BbqConfig  # noqa: F401
from regift_jax.data.builders.regift_traces import RegiftTraces, RegiftTracesConfig  # noqa: F401
from regift_jax.data.builders.squad_v2 import SquadV2, SquadV2Config, article_bucket  # noqa: F401


def offline_download_config(**kwargs) -> "tfds.download.DownloadConfig":
    """A ``DownloadConfig`` that never asks GCS for pre-built data (``try_download_gcs=False``)."""
    kwargs.setdefault("try_download_gcs", False)
    return tfds.download.DownloadConfig(**kwargs)
