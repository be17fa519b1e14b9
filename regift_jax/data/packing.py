"""Sequence packing: several tokenized examples per fixed-length row, with segment ids.

Row layout (all ``int32 [L]``; a batch stacks rows to ``[B, L]``):

* ``inputs``      token ids; padding is ``pad_id``.
* ``targets``     next-token labels: ``targets[t] = inputs[t + 1]`` *within a segment*.  The last
  token of every segment predicts nothing (target ``pad_id``, mask 0), so no label ever crosses
  from one example into the next (or into padding).
* ``loss_mask``   aligned with ``targets``: ``loss_mask[t] = example_mask[t + 1]`` inside a segment,
  0 on each segment's last token and on padding.  With the masks from
  :mod:`regift_jax.data.tokenize` this is 1 exactly where the *target* is a response token.
* ``segment_ids`` 1..k for the k examples of the row in order, 0 for padding.
* ``positions``   restart at 0 at each segment (they drive RoPE); 0 on padding.

An example of ``n`` tokens occupies ``n`` slots and yields ``n - 1`` predictions, so the tokenizer
``max_len`` equals the row length ``L``.

Packing policies (:class:`Packer`, streaming, deterministic):

* ``"first_fit"``: keep up to ``max_open_rows`` partially filled rows; put each example into the
  first (oldest) open row with room; if none has room, open a new row, first emitting the oldest
  open row when ``max_open_rows`` are already open.  A row that becomes exactly full is emitted at
  once.  Larger ``max_open_rows`` packs tighter.
* ``"sequential"``: first-fit with one open row (next-fit): rows keep the input order exactly.
* ``"none"``: one example per row, right-padded (the unpacked mode; same fields, so the trainer
  does not care which mode produced a batch).

Rows are emitted in a deterministic order that depends only on the example sequence.  The packer
stores examples together with an opaque, JSON-serialisable ``ref`` per example, so a pipeline can
checkpoint the open rows as lists of refs and rebuild them on resume (:mod:`pipeline`).

Everything here is pure numpy.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
METHODS = ("first_fit", "sequential", "none")

Example = Mapping[str, np.ndarray]  # {"input_ids": int32[n], "loss_mask": int32[n]}


def _check_example(ex: Example, seq_len: int) -> int:
    ids, mask = ex["input_ids"], ex["loss_mask"]
    n = len(ids)
    if len(mask) != n:
        raise ValueError(f"input_ids and loss_mask lengths differ ({n} vs {len(mask)})")
    if n == 0:
        raise ValueError("cannot pack an empty example")
    if n > seq_len:
        raise ValueError(f"example of {n} tokens does not fit a row of {seq_len}; tokenize with "
                         f"max_len <= {seq_len}")
    return n


def build_row(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> Dict[str, np.ndarray]:
    """One packed row (dict of ``int32 [seq_len]``) holding ``examples`` in order."""
    row = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
    if pad_id:
        row["inputs"][:] = pad_id
        row["targets"][:] = pad_id
    off = 0
    for s, ex in enumerate(examples, start=1):
        n = _check_example(ex, seq_len)
        if off + n > seq_len:
            raise ValueError(f"examples of total length {off + n} exceed the row length {seq_len}")
        ids = np.asarray(ex["input_ids"], np.int32)
        mask = np.asarray(ex["loss_mask"], np.int32)
        row["inputs"][off:off + n] = ids
        row["targets"][off:off + n - 1] = ids[1:]
        row["loss_mask"][off:off + n - 1] = mask[1:]
        row["segment_ids"][off:off + n] = s
        row["positions"][off:off + n] = np.arange(n, dtype=np.int32)
        off += n
    return row


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]], seq_len: int,
               num_rows: Optional[int] = None, pad_id: int = 0) -> Dict[str, np.ndarray]:
    """Stack rows into ``[num_rows, seq_len]`` arrays, appending empty (all padding) rows."""
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    out = {k: np.zeros((num_rows, seq_len), np.int32) for k in FIELDS}
    if pad_id:
        out["inputs"][:] = pad_id
        out["targets"][:] = pad_id
    for i, r in enumerate(rows):
        for k in FIELDS:
            out[k][i] = r[k]
    return out


class Packer:
    """Streaming packer.  ``add(example, ref)`` returns the rows completed by this example, each a
    list of ``(ref, example)``; ``flush()`` returns the remaining open rows (oldest first)."""

    def __init__(self, seq_len: int, method: str = "first_fit", max_open_rows: int = 16):
        if method not in METHODS:
            raise ValueError(f"packing method must be one of {METHODS}, got {method!r}")
        if max_open_rows < 1:
            raise ValueError(f"max_open_rows must be >= 1, got {max_open_rows}")
        self.seq_len = int(seq_len)
        self.method = method
        self.max_open_rows = 1 if method == "sequential" else int(max_open_rows)
        self._rows: List[List[Tuple[Any, Example]]] = []
        self._free: List[int] = []

    @property
    def open_rows(self) -> List[List[Tuple[Any, Example]]]:
        return self._rows

    def add(self, example: Example, ref: Any = None) -> List[List[Tuple[Any, Example]]]:
        n = _check_example(example, self.seq_len)
        item = (ref, example)
        if self.method == "none":
            return [[item]]
        done = []
        for i, free in enumerate(self._free):
            if n <= free:
                self._rows[i].append(item)
                self._free[i] -= n
                if self._free[i] == 0:
                    done.append(self._rows.pop(i))
                    self._free.pop(i)
                return done
        if n == self.seq_len:  # a full row on its own
            if self.method == "sequential":  # keep the input order: close the open row first
                done.extend(self.flush())
            done.append([item])
            return done
        if len(self._rows) >= self.max_open_rows:
            done.append(self._rows.pop(0))
            self._free.pop(0)
        self._rows.append([item])
        self._free.append(self.seq_len - n)
        return done

    def flush(self) -> List[List[Tuple[Any, Example]]]:
        rows, self._rows, self._free = self._rows, [], []
        return rows

    def restore(self, rows: Sequence[Sequence[Tuple[Any, Example]]]) -> None:
        """Replace the open rows (e.g. rebuilt from a checkpoint's refs)."""
        self._rows, self._free = [], []
        for r in rows:
            used = sum(_check_example(ex, self.seq_len) for _, ex in r)
            if used > self.seq_len:
                raise ValueError(f"restored row of {used} tokens exceeds {self.seq_len}")
            self._rows.append(list(r))
            self._free.append(self.seq_len - used)


def pack_examples(examples: Iterable[Example], seq_len: int, method: str = "first_fit",
                  max_open_rows: int = 16, pad_id: int = 0) -> Dict[str, np.ndarray]:
    """Pack a finite list of examples into ``[R, seq_len]`` arrays (all examples, in emission
    order; the last open rows are flushed oldest first)."""
    packer = Packer(seq_len, method, max_open_rows)
    rows = []
    for ex in examples:
        rows.extend(packer.add(ex))
    rows.extend(packer.flush())
    built = [build_row([ex for _, ex in r], seq_len, pad_id) for r in rows]
    return stack_rows(built, seq_len, pad_id=pad_id)


def pad_examples(examples: Iterable[Example], seq_len: int,
                 pad_id: int = 0) -> Dict[str, np.ndarray]:
    """Unpacked mode: one example per row, right-padded; same fields as :func:`pack_examples`."""
    return pack_examples(examples, seq_len, method="none", pad_id=pad_id)


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
    """Fraction of non-padding slots (``segment_ids != 0``)."""
    seg = np.asarray(batch["segment_ids"])
    return float((seg != 0).mean()) if seg.size else 0.0


def unpack_row(row: Mapping[str, np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """Inverse of :func:`build_row`: the examples of one packed row (``input_ids`` and the
    reconstructed ``loss_mask``; the mask of each example's first token is not stored in a row and
    comes back as 0)."""
    seg = np.asarray(row["segment_ids"])
    out = []
    for s in np.unique(seg[seg != 0]):
        idx = np.nonzero(seg == s)[0]
        ids = np.asarray(row["inputs"])[idx]
        mask = np.zeros(len(idx), np.int32)
        mask[1:] = np.asarray(row["loss_mask"])[idx[:-1]]
        out.append({"input_ids": ids.astype(np.int32), "loss_mask": mask})
    return out
