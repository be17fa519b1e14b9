"""Sequence packing: exact row layout, invariants, policies, and packed == unpacked logits."""

import numpy as np
import pytest

from regift_jax.data.packing import (FIELDS, Packer, build_row, pack_examples, pad_examples,
                                     packing_efficiency, stack_rows, unpack_row)


def ex(ids, mask):
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


def random_examples(rng, n, max_len, vocab=1000):
    out = []
    for _ in range(n):
        k = int(rng.integers(2, max_len + 1))
        p = int(rng.integers(0, k))  # prompt length
        out.append(ex(rng.integers(3, vocab, k), [0] * p + [1] * (k - p)))
    return out


def test_build_row_exact_layout():
    a = ex([11, 12, 13], [0, 1, 1])
    b = ex([21, 22, 23, 24], [0, 0, 1, 1])
    row = build_row([a, b], 10, pad_id=0)
    assert row["inputs"].tolist() == [11, 12, 13, 21, 22, 23, 24, 0, 0, 0]
    assert row["targets"].tolist() == [12, 13, 0, 22, 23, 24, 0, 0, 0, 0]
    assert row["loss_mask"].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0, 0]
    assert all(row[k].dtype == np.int32 for k in FIELDS)
    row7 = build_row([a], 5, pad_id=7)
    assert row7["inputs"].tolist() == [11, 12, 13, 7, 7]
    assert row7["targets"].tolist() == [12, 13, 7, 7, 7]
    with pytest.raises(ValueError, match="exceed the row length"):
        build_row([a, b], 6)
    with pytest.raises(ValueError, match="does not fit a row"):
        Packer(3).add(b)
    with pytest.raises(ValueError, match="lengths differ"):
        build_row([ex([1, 2], [1])], 4)


def check_packed(batch, examples, seq_len):
    """Invariants of a packed batch, checked against the source examples."""
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    got = []
    for r in range(inputs.shape[0]):
        s = seg[r]
        nz = np.nonzero(s)[0]
        if len(nz):  # non-padding is a prefix; segment ids are 1..k in order
            assert nz.tolist() == list(range(len(nz)))
            assert np.all(np.diff(s[nz]) >= 0) and s[0] == 1 and np.all(np.diff(s[nz]) <= 1)
        pad = s == 0
        for k in FIELDS:
            assert np.all(batch[k][r][pad] == 0), k
        for t in range(seq_len):
            same_next = t + 1 < seq_len and s[t] != 0 and s[t + 1] == s[t]
            if same_next:
                assert targets[r, t] == inputs[r, t + 1]
                assert pos[r, t + 1] == pos[r, t] + 1
            else:
                assert mask[r, t] == 0 and targets[r, t] == 0
            if s[t] != 0 and (t == 0 or s[t - 1] != s[t]):
                assert pos[r, t] == 0
        got.extend(unpack_row({k: batch[k][r] for k in FIELDS}))
    # Every example exactly once, masks shifted correctly (first-token mask is not stored).
    key = lambda e: tuple(e["input_ids"].tolist())
    want = sorted((key(e), tuple([0] + e["loss_mask"].tolist()[1:])) for e in examples)
    have = sorted((key(e), tuple(e["loss_mask"].tolist())) for e in got)
    assert have == want


@pytest.mark.parametrize("method", ["first_fit", "sequential", "none"])
def test_packing_invariants_random(method):
    rng = np.random.default_rng(0)
    L = 64
    for trial in range(5):
        examples = random_examples(rng, 60, L)
        batch = pack_examples(examples, L, method=method, max_open_rows=8)
        check_packed(batch, examples, L)
        again = pack_examples(examples, L, method=method, max_open_rows=8)
        assert all(np.array_equal(batch[k], again[k]) for k in FIELDS)  # deterministic
        if method == "none":
            assert batch["inputs"].shape[0] == len(examples)
        if method == "sequential":  # next-fit keeps the input order
            order = [tuple(e["input_ids"].tolist()) for r in range(batch["inputs"].shape[0])
                     for e in unpack_row({k: batch[k][r] for k in FIELDS})]
            assert order == [tuple(e["input_ids"].tolist()) for e in examples]
        # Lower bound on rows: total tokens / L.
        total = sum(len(e["input_ids"]) for e in examples)
        assert batch["inputs"].shape[0] >= -(-total // L)
        assert packing_efficiency(batch) == pytest.approx(total / batch["inputs"].size)


def test_first_fit_policy_exact():
    L = 10
    lens = [6, 6, 3, 5, 4, 1, 10, 2]
    exs = [ex(np.arange(1, n + 1) + 100 * i, [1] * n) for i, n in enumerate(lens)]
    p = Packer(L, "first_fit", max_open_rows=2)
    emitted = []
    for i, e in enumerate(exs):
        emitted.append([[ref for ref, _ in r] for r in p.add(e, ref=i)])
    # 0 opens A(6); 1 opens B(6); 2 -> A(9); 3 fits nowhere, 2 rows open: emit A, open C(5);
    # 4 -> B(10) full, emitted; 5 -> C(6); 6 is full-length: emitted alone; 7 -> C(8).
    assert emitted == [[], [], [], [[0, 2]], [[1, 4]], [], [[6]], []]
    assert [[ref for ref, _ in r] for r in p.flush()] == [[3, 5, 7]]
    seq = Packer(L, "sequential")
    out = []
    for i, e in enumerate(exs):
        out += [[ref for ref, _ in r] for r in seq.add(e, ref=i)]
    out += [[ref for ref, _ in r] for r in seq.flush()]
    assert out == [[0], [1, 2], [3, 4, 5], [6], [7]]


def test_first_fit_packs_tighter_than_sequential():
    rng = np.random.default_rng(1)
    examples = random_examples(rng, 400, 256)
    rows_ff = pack_examples(examples, 256, "first_fit", max_open_rows=16)["inputs"].shape[0]
    rows_seq = pack_examples(examples, 256, "sequential")["inputs"].shape[0]
    assert rows_ff < rows_seq


def test_unpacked_mode_and_stack_rows():
    a, b = ex([5, 6, 7], [0, 1, 1]), ex([8, 9], [0, 1])
    batch = pad_examples([a, b], 4)
    assert set(batch) == set(FIELDS)
    assert batch["inputs"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    padded = stack_rows([build_row([a], 4)], 4, num_rows=3)
    assert padded["inputs"].shape == (3, 4) and not padded["segment_ids"][1:].any()
    with pytest.raises(ValueError):
        stack_rows([build_row([a], 4)] * 2, 4, num_rows=1)


def test_restore_open_rows():
    L = 10
    exs = [ex(np.arange(n) + 1, [1] * n) for n in (4, 3, 5, 2, 6)]
    p1 = Packer(L, "first_fit", 3)
    out1 = []
    for i, e in enumerate(exs):
        out1 += [[r for r, _ in row] for row in p1.add(e, i)]
    # Replay: stop after 3 examples, restore the open rows into a fresh packer.
    p2 = Packer(L, "first_fit", 3)
    out2 = []
    for i, e in enumerate(exs[:3]):
        out2 += [[r for r, _ in row] for row in p2.add(e, i)]
    p3 = Packer(L, "first_fit", 3)
    p3.restore(p2.open_rows)
    for i, e in enumerate(exs[3:], start=3):
        out2 += [[r for r, _ in row] for row in p3.add(e, i)]
    assert out1 == out2
    assert [[r for r, _ in row] for row in p1.flush()] == [[r for r, _ in row] for row in p3.flush()]


def test_packed_logits_match_unpacked():
    """A packed row gives each example exactly the logits it gets alone (segment-restricted
    causal attention, positions restarting per segment); padding stays finite.

    RoPE is relative, so logits cannot reveal *whether* positions restart (a constant offset per
    segment cancels); the restart itself is checked by the layout tests above."""
    pytest.importorskip("regift_jax.models.decoder")
    import jax
    import jax.numpy as jnp

    from regift_jax.models.config import ModelConfig
    from regift_jax.models.decoder import Decoder

    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, rope_theta=10000.0)
    rng = np.random.default_rng(0)
    lens = [5, 9, 7]
    examples = [ex(rng.integers(1, cfg.vocab_size, n), [0, 0] + [1] * (n - 2)) for n in lens]
    L = 24  # 21 tokens + 3 padding
    packed = pack_examples(examples, L, method="sequential")
    assert packed["inputs"].shape == (1, L)
    model = Decoder(cfg)
    ids0 = jnp.asarray(packed["inputs"])
    pos0 = jnp.asarray(packed["positions"])
    seg0 = jnp.asarray(packed["segment_ids"])
    # Parameters of ``model.init``'s structure, drawn with numpy (eager ``init`` of the scanned
    # model costs ~20 s of op-by-op dispatch on a small CPU; the values just need to be random).
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids0, positions=pos0,
                                               segment_ids=seg0))["params"]
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)), shapes)
    apply = jax.jit(lambda i, p, s: model.apply({"params": params}, i, positions=p,
                                                segment_ids=s))
    logits = np.asarray(apply(ids0, pos0, seg0))
    assert logits.shape == (1, L, cfg.vocab_size)
    assert np.all(np.isfinite(logits)), "padding positions must not produce NaN/inf logits"
    padded = pad_examples(examples, L)
    logits_pad = np.asarray(apply(jnp.asarray(padded["inputs"]), jnp.asarray(padded["positions"]),
                                  jnp.asarray(padded["segment_ids"])))
    # Reference: each example alone, as an ordinary unpacked sequence (segment ids all 1,
    # positions 0..L-1) followed by junk tokens that causality keeps from mattering.
    alone_ids = rng.integers(1, cfg.vocab_size, (len(examples), L)).astype(np.int32)
    for i, e in enumerate(examples):
        alone_ids[i, :len(e["input_ids"])] = e["input_ids"]
    alone = np.asarray(apply(jnp.asarray(alone_ids),
                             jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (len(lens), L)),
                             jnp.ones((len(lens), L), jnp.int32)))
    # ... and once at its exact length, with the decoder's defaults (no positions/segments).
    exact = np.asarray(jax.jit(lambda i: model.apply({"params": params}, i))(
        jnp.asarray(examples[0]["input_ids"])[None]))
    np.testing.assert_allclose(alone[0, :lens[0]], exact[0], rtol=1e-5, atol=1e-5)
    off = 0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        np.testing.assert_allclose(logits[0, off:off + n], alone[i, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits_pad[i, :n], alone[i, :n], rtol=1e-5, atol=1e-5)
        off += n

    # The masked next-token loss of the packed row equals the sum over examples alone.
    def nll(lg, tgt, m):
        lp = jax.nn.log_softmax(jnp.asarray(lg), -1)
        return float((-jnp.take_along_axis(lp, jnp.asarray(tgt)[..., None], -1)[..., 0] *
                      jnp.asarray(m)).sum())
    total_alone = sum(nll(alone[i, :n - 1], e["input_ids"][1:], e["loss_mask"][1:])
                      for i, (e, n) in enumerate(zip(examples, lens)))
    assert nll(logits[0], packed["targets"][0], packed["loss_mask"][0]) == pytest.approx(
        total_alone, rel=1e-5)
