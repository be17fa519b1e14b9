"""benchmarks/roofline.py: the FLOP counts behind the bounds in BENCHMARKS.md, checked against
the trainer's MFU formula and an explicit count of the causal mask."""

import importlib.util
import os

import numpy as np

from _data import REPO
from regift_jax.models.config import ModelConfig

spec = importlib.util.spec_from_file_location("roofline",
                                              os.path.join(REPO, "benchmarks", "roofline.py"))
roofline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(roofline)

SMOL = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                   tie_word_embeddings=True)


def test_causal_chunk_score_count_matches_the_mask():
    for T, chunk in [(512, 128), (70, 16), (33, 8), (64, 0), (10, 64)]:
        q = np.arange(T)[:, None]
        k = np.arange(T)[None, :]
        if chunk:
            computed = k < (q // chunk + 1) * chunk  # keys up to the query chunk's end
        else:
            computed = np.ones((T, T), bool)
        assert roofline.causal_scores(T, chunk) == int(computed.sum())
        assert (~computed & (k <= q)).sum() == 0  # no attended entry is skipped
    assert roofline.causal_scores(512, 128) == 163840


def test_full_fine_tuning_flops_equal_the_trainer_formula_without_the_fast_paths():
    rows, seq = 8, 512
    f = roofline.sft_flops(SMOL, rows, seq, loss_tokens=684, loss_chunk=0, attention_chunk=0,
                           full=True)
    want = SMOL.flops_per_token(seq) * rows * seq
    np.testing.assert_allclose(f["total"], want, rtol=1e-3)  # norms are the only difference
    fast = roofline.sft_flops(SMOL, rows, seq, loss_tokens=684, loss_chunk=512,
                              attention_chunk=128, full=True)
    assert fast["head_rows"] == 1024 and fast["total"] < f["total"]
