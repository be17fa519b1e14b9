"""Per-host streaming SFT input pipeline: shard -> shuffle -> tokenize -> pack -> fixed batches.

Design
------
**Why not tf.data for the stream.**  Exact, JSON-serialisable resume is the priority (a restarted
job must see exactly the batches it would have seen).  tf.data's shuffle buffers and iterator
checkpoints are neither JSON nor cheap to fast-forward, so the stream is a plain Python generator
with an explicit cursor.  tf.data / TFDS are used only to *read* a TFDS source.  Tokenization is
the costly part; it runs in the Rust tokenizer in chunks (``tokenize_chunk`` examples per call)
and, with ``prefetch > 0``, on a background thread that overlaps the accelerator step (the
tokenizer releases the GIL).

**Sources and sharding.**  A source is a list of example dicts, a JSONL path (or list of paths), a
``tf.data.Dataset`` (e.g. ``tfds.builder(name).as_dataset(split=..., shuffle_files=False)``) or a
TFDS ``DatasetBuilder`` plus ``split``.  Sharding happens *before* tokenization, by example index
in the source's deterministic order: process ``k`` of ``P`` keeps examples ``k, k+P, k+2P, ...``
(``tf.data.Dataset.shard(P, k)``; JSONL and JSONL.gz files are read with
:func:`regift_jax.core.io.iter_jsonl`).  The host's raw records (text, small) are held in memory
for random access; tokens are produced lazily.

**Order.**  Epoch ``e`` visits the host's records in ``np.random.default_rng(seed + e)
.permutation(n_local)`` order (identity if ``shuffle=False``).  The stream of examples is
therefore a pure function of ``(seed, source, process_index, process_count)``, and any example
is addressed by its ``ref = [epoch, index_in_epoch]``.

**Packing and the epoch boundary.**  Examples flow into a :class:`~regift_jax.data.packing.Packer`
(``first_fit`` / ``sequential`` / ``none``).  With ``epoch_boundary="continue"`` (default) the
stream is continuous: a row (and a batch) may hold the tail of epoch ``e`` and the head of ``e+1``
(no padding is wasted at epoch ends).  With ``"flush"`` all open rows are emitted at the end of
each epoch, so no *row* mixes epochs (batches still may).  After the last epoch
(``num_epochs``) open rows are flushed and the final partial batch is padded with empty rows
(segment 0, loss mask 0), or dropped with ``drop_remainder=True``.  ``num_epochs=None`` repeats
forever.  NOTE for multi-host training with finite ``num_epochs``: hosts pack different examples
and may produce a different number of batches; the trainer must run a step count agreed on by all
hosts (or use ``num_epochs=None`` and count steps).

**Checkpointable state.**  ``get_state()`` returns (JSON-serialisable)::

    {"version", "epoch", "index",            # cursor: next example to feed the packer
     "open_rows": [[ref, ...], ...],          # partially filled rows, as example refs
     "ready_rows": [[ref, ...], ...],         # completed rows not yet put in a batch
     "epoch_kept", "finished", "stats", "config"}

``set_state`` re-tokenizes the referenced examples (deterministic) to rebuild the packer, so the
state stays small (refs, not tokens) and the next batch is bitwise what the uninterrupted
iterator would have produced.  ``config`` (seed, shard, lengths, packing ...) is checked on
restore; resuming with a different process count or packing is refused with a clear error.
With prefetching, ``get_state`` describes the position after the last batch *returned* by
``next``, not the producer's position.

**Batches.**  ``next(it)`` returns this host's slice ``{inputs, targets, loss_mask, segment_ids,
positions}`` of ``int32 [global_batch // process_count, seq_len]``; :func:`make_global_array`
assembles the global ``jax.Array`` sharded along ``data_axes``.

**Statistics** (:class:`PipelineStats`, also checkpointed): examples read, kept, dropped by reason,
truncated (and tokens cut), rows, batches, non-pad tokens, loss tokens, slots and packing
efficiency (non-pad fraction of all slots, empty padding rows included).

**Bad input** raises ``ValueError`` naming the file and line (JSONL: the first bad line, and every
bad line counted by reason: ``invalid_utf8``, ``malformed_json``, ``not_an_object``,
``truncated_tail``; blank lines are skipped) or the element index (lists / TFDS) together with the
cause; overlong and empty examples are counted, never silent.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import queue
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from regift_jax.core import io as core_io
from regift_jax.data import packing as packing_lib
from regift_jax.data.tokenize import (DEFAULT_RESPONSE_TEMPLATE, Response, SFTTokenizer,
                                      TokenizeStats, response_pieces)

STATE_VERSION = 1
EPOCH_BOUNDARIES = ("continue", "flush")

Render = Callable[[Mapping[str, Any]], Tuple[str, Response]]


# ============================================================================= renders
def prompt_response_render(record: Mapping[str, Any]) -> Tuple[str, Response]:
    """Render records that already hold ``"prompt"`` and ``"response"`` (str or pieces)."""
    return record["prompt"], record["response"]


def make_trace_render(prompt_fn: Callable[[Mapping[str, Any]], str],
                      response_template: str = DEFAULT_RESPONSE_TEMPLATE,
                      reasoning_key: Optional[str] = "reasoning", answer_key: str = "answer",
                      strip: bool = True) -> Render:
    """A render for trace records: ``prompt_fn(record)`` and ``response_template`` filled with
    the record's reasoning and answer as :class:`~regift_jax.data.tokenize.Piece` s (so that
    ``overlong="truncate_reasoning"`` knows the reasoning span).

    ``response_template`` uses ``{reasoning}`` / ``{answer}`` placeholders (e.g.
    ``prompts.get_template("student_train").target_text``); ``reasoning_key=None`` for a template
    without reasoning.  ``strip`` strips surrounding whitespace from both values, as the authors
    did before formatting.
    """
    def value(record, key):
        v = str(record[key])
        return v.strip() if strip else v

    def render(record):
        reasoning = value(record, reasoning_key) if reasoning_key is not None else None
        return prompt_fn(record), response_pieces(reasoning, value(record, answer_key),
                                                  response_template)
    return render


# ============================================================================= sources
def _decode_tf(x):
    """numpy values from ``as_numpy_iterator`` -> Python (bytes -> str, arrays -> lists)."""
    if isinstance(x, dict):
        return {k: _decode_tf(v) for k, v in x.items()}
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        if x.ndim == 0:
            return _decode_tf(x.item())
        return [_decode_tf(v) for v in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _is_tf_dataset(obj) -> bool:
    return type(obj).__module__.startswith("tensorflow") and hasattr(obj, "shard") and hasattr(
        obj, "as_numpy_iterator")


def _is_tfds_builder(obj) -> bool:
    tfds = sys.modules.get("tensorflow_datasets")  # a builder object implies TFDS is imported
    return tfds is not None and isinstance(obj, tfds.core.DatasetBuilder)


# What a skipped JSONL line is called in the error (blank lines are not examples: no error).
_BAD_LINE = {core_io.INVALID_UTF8: "invalid UTF-8", core_io.MALFORMED_JSON: "invalid JSON",
             core_io.NOT_AN_OBJECT: "expected a JSON object",
             core_io.TRUNCATED_TAIL: "compressed stream ends early"}


def _check_lines(path: str, counts: core_io.LineCounts) -> None:
    """Raise ``ValueError`` at the first bad line of ``path`` (``file:line``, what is wrong), with
    the count of every bad line by reason."""
    bad = []
    for reason, samples in counts.samples.items():
        if reason in _BAD_LINE:
            for sample in samples:  # "path:line: detail", the first lines of each reason
                line, _, detail = sample[len(path) + 1:].partition(": ")
                bad.append((int(line), reason, detail))
    if bad:
        line, reason, detail = min(bad)
        raise ValueError(f"{path}:{line}: {_BAD_LINE[reason]} ({detail}); {counts.summary()}")


def _read_jsonl(paths: Sequence[str], k: int, p: int):
    records, origins = [], []
    g = 0  # index among the examples of all files, in order
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"JSONL source not found: {path}")
        counts = core_io.LineCounts()
        lines = list(core_io.iter_jsonl(path, counts))
        _check_lines(path, counts)
        for lineno, rec in lines:
            if g % p == k:
                records.append(rec)
                origins.append(f"{path}:{lineno}")
            g += 1
    return records, origins, g


def load_shard(source, process_index: int, process_count: int, split: Optional[str] = None):
    """This host's records: ``(records, origins, total_examples_in_source)``.

    Keeps examples ``process_index, process_index + process_count, ...`` of the source order.
    """
    k, p = int(process_index), int(process_count)
    if not 0 <= k < p:
        raise ValueError(f"process_index={k} is not in [0, process_count={p})")
    if isinstance(source, (str, os.PathLike)):
        return _read_jsonl([os.fspath(source)], k, p)
    if _is_tfds_builder(source):
        if split is None:
            raise ValueError("a TFDS builder source needs split=... (e.g. 'train')")
        name = f"{source.info.name}/{split}"
        ds = source.as_dataset(split=split, shuffle_files=False)
        return _read_tf(ds, k, p, name)
    if _is_tf_dataset(source):
        return _read_tf(source, k, p, "tf.data dataset")
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, os.PathLike)) for s in source):
            return _read_jsonl([os.fspath(s) for s in source], k, p)
        records, origins = [], []
        for i in range(k, len(source), p):
            if not isinstance(source[i], Mapping):
                raise ValueError(f"example #{i}: expected a dict, got {type(source[i]).__name__}")
            records.append(source[i])
            origins.append(f"example #{i}")
        return records, origins, len(source)
    raise TypeError(f"unsupported source type {type(source).__name__}: pass a list of dicts, a "
                    "JSONL path (or list of paths), a tf.data.Dataset or a TFDS builder + split")


def _read_tf(ds, k, p, name):
    n_total = int(ds.cardinality().numpy()) if hasattr(ds, "cardinality") else -1
    records, origins = [], []
    for j, el in enumerate(ds.shard(p, k).as_numpy_iterator()):
        rec = _decode_tf(el)
        if not isinstance(rec, dict):
            raise ValueError(f"{name} element #{k + p * j}: expected a feature dict")
        records.append(rec)
        origins.append(f"{name} element #{k + p * j}")
    return records, origins, n_total


# ============================================================================= stats
@dataclasses.dataclass
class PipelineStats:
    tokenize: TokenizeStats = dataclasses.field(default_factory=TokenizeStats)
    rows: int = 0
    batches: int = 0
    tokens: int = 0  # non-pad tokens emitted
    loss_tokens: int = 0  # targets with loss_mask 1
    slots: int = 0  # batch rows * seq_len, padding rows included

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.slots if self.slots else 0.0

    def to_dict(self) -> dict:
        return {"examples_read": self.tokenize.seen, "tokenize": self.tokenize.to_dict(),
                "rows": self.rows, "batches": self.batches, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "slots": self.slots,
                "packing_efficiency": self.packing_efficiency}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineStats":
        return cls(tokenize=TokenizeStats.from_dict(d["tokenize"]), rows=int(d["rows"]),
                   batches=int(d["batches"]), tokens=int(d["tokens"]),
                   loss_tokens=int(d["loss_tokens"]), slots=int(d["slots"]))


# ============================================================================= pipeline
class SFTPipeline:
    """Iterator over this host's fixed-shape SFT batches.  See the module docstring.

    Args:
      source: list of dicts | JSONL path(s) | ``tf.data.Dataset`` | TFDS builder (+ ``split``).
      tokenizer: a Hugging Face tokenizer.
      render: ``record -> (prompt, response)``; response is a str or pieces (see
        :func:`make_trace_render`, :func:`prompt_response_render`).
      seq_len: row length L (also the tokenizer ``max_len``).
      global_batch: rows per global batch; must be divisible by ``process_count``.
      seed / shuffle: per-epoch permutation with ``seed + epoch``.
      num_epochs: ``None`` = repeat forever.
      packing / max_open_rows: see :class:`~regift_jax.data.packing.Packer`.
      epoch_boundary: ``"continue"`` or ``"flush"`` (see the module docstring).
      drop_remainder: drop the final partial batch instead of padding it with empty rows.
      overlong, add_bos, add_eos, eos_id, boundary: see
        :class:`~regift_jax.data.tokenize.SFTTokenizer`.
      pad_id: id written to padded input/target slots.
      split: the split when ``source`` is a TFDS builder.
      process_index / process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      tokenize_chunk: examples per tokenizer call.
      prefetch: batches prepared ahead on a background thread (0 = synchronous).
    """

    def __init__(self, source, tokenizer, render: Render = prompt_response_render, *,
                 seq_len: int, global_batch: int, seed: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None, packing: str = "first_fit",
                 max_open_rows: int = 16, epoch_boundary: str = "continue",
                 drop_remainder: bool = False, overlong: str = "drop",
                 add_bos: Optional[bool] = None, add_eos: bool = True,
                 eos_id: Optional[int] = None, boundary: str = "auto", pad_id: int = 0,
                 split: Optional[str] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 tokenize_chunk: int = 64, prefetch: int = 2):
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch % process_count:
            raise ValueError(f"global_batch={global_batch} is not divisible by "
                             f"process_count={process_count}")
        if epoch_boundary not in EPOCH_BOUNDARIES:
            raise ValueError(f"epoch_boundary must be one of {EPOCH_BOUNDARIES}, "
                             f"got {epoch_boundary!r}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if packing not in packing_lib.METHODS:
            raise ValueError(f"packing must be one of {packing_lib.METHODS}, got {packing!r}")
        self.seq_len = int(seq_len)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // int(process_count)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.packing, self.max_open_rows = packing, int(max_open_rows)
        self.epoch_boundary, self.drop_remainder = epoch_boundary, bool(drop_remainder)
        self.pad_id = int(pad_id)
        self.render = render
        self.tokenize_chunk = max(1, int(tokenize_chunk))
        self.prefetch = max(0, int(prefetch))
        self.tok = SFTTokenizer(tokenizer, self.seq_len, overlong=overlong, add_bos=add_bos,
                                add_eos=add_eos, eos_id=eos_id, boundary=boundary)
        self._records, self._origins, self.source_size = load_shard(
            source, self.process_index, self.process_count, split)
        if not self._records:
            raise ValueError(f"process {self.process_index} of {self.process_count} has no "
                             f"examples (the source has {self.source_size})")
        self._config = {
            "seed": self.seed, "shuffle": self.shuffle, "num_epochs": self.num_epochs,
            "process_index": self.process_index, "process_count": self.process_count,
            "num_local_examples": len(self._records), "seq_len": self.seq_len,
            "global_batch": self.global_batch, "packing": self.packing,
            "max_open_rows": self.max_open_rows, "epoch_boundary": self.epoch_boundary,
            "overlong": overlong, "bos_id": self.tok.bos_id, "eos_id": self.tok.eos_id,
            "boundary": self.tok.boundary,
        }
        self._order_cache: Dict[int, np.ndarray] = {}
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._terminal = None
        self._stop = threading.Event()
        self._reset_producer()
        self._state = self._snapshot()

    # ------------------------------------------------------------------ public API
    @property
    def num_local_examples(self) -> int:
        return len(self._records)

    @property
    def stats(self) -> PipelineStats:
        """Statistics as of the last batch returned by ``next``."""
        return PipelineStats.from_dict(self._state["stats"])

    def get_state(self) -> dict:
        return copy.deepcopy(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported pipeline state version {state.get('version')!r}")
        mismatched = {k: (state["config"].get(k), v) for k, v in self._config.items()
                      if state["config"].get(k) != v}
        if mismatched:
            raise ValueError("pipeline state was saved with a different configuration "
                             "(saved, current): " + ", ".join(f"{k}={a!r} vs {b!r}"
                                                               for k, (a, b) in mismatched.items()))
        self._stop_thread(rewind=False)
        self._restore(state)
        self._state = copy.deepcopy(dict(state))

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Put the producer exactly at ``state`` (re-tokenizing the referenced examples)."""
        self._reset_producer()
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._epoch_kept = int(state["epoch_kept"])
        self._finished = bool(state["finished"])
        self._pstats = PipelineStats.from_dict(state["stats"])
        self._packer.restore([self._rebuild(r) for r in state["open_rows"]])
        self._ready = [self._rebuild(r) for r in state["ready_rows"]]

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self.prefetch == 0:
            batch = self._produce()
            if batch is None:
                raise StopIteration
            self._state = self._snapshot()
            return batch
        if self._terminal is not None:  # the producer has ended (or failed): keep saying so
            if self._terminal[0] == "end":
                raise StopIteration
            raise self._terminal[1]
        if self._thread is None:
            self._start_thread()
        item = self._queue.get()
        if item[0] == "batch":
            self._state = item[2]
            return item[1]
        self._thread.join()
        self._thread, self._queue = None, None
        self._terminal = item
        return self.__next__()

    def close(self) -> None:
        """Stop the prefetch thread (the iterator stays usable from the last returned batch)."""
        self._stop_thread(rewind=True)

    def __del__(self):
        try:
            self._stop_thread(rewind=False)
        except Exception:
            pass

    # ------------------------------------------------------------------ producer
    def _reset_producer(self):
        self._epoch, self._index, self._epoch_kept = 0, 0, 0
        self._finished = False
        self._packer = packing_lib.Packer(self.seq_len, self.packing, self.max_open_rows)
        self._ready: List[List[Tuple[Any, Any]]] = []
        self._lookahead: Dict[Tuple[int, int], Tuple[Any, str, int]] = {}
        self._pstats = PipelineStats()

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "index": self._index,
            "epoch_kept": self._epoch_kept, "finished": self._finished,
            "open_rows": [[list(ref) for ref, _ in r] for r in self._packer.open_rows],
            "ready_rows": [[list(ref) for ref, _ in r] for r in self._ready],
            "stats": self._pstats.to_dict(), "config": dict(self._config),
        }

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            n = len(self._records)
            order = (np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order_cache = {epoch: order}  # one epoch at a time is enough
        return self._order_cache[epoch]

    def _render(self, i: int):
        rec = self._records[i]
        try:
            prompt, response = self.render(rec)
        except Exception as e:
            raise ValueError(f"{self._origins[i]}: cannot render example: "
                             f"{type(e).__name__}: {e}") from e
        if not isinstance(prompt, str):
            raise ValueError(f"{self._origins[i]}: render returned a prompt of type "
                             f"{type(prompt).__name__}, expected str")
        return prompt, response

    def _tokenize_refs(self, refs: Sequence[Tuple[int, int]]):
        pairs = [self._render(int(self._order(e)[j])) for e, j in refs]
        return self.tok.encode_batch(pairs)

    def _rebuild(self, refs) -> List[Tuple[Any, Any]]:
        refs = [tuple(int(v) for v in r) for r in refs]
        row = []
        for ref, (ex, status, _) in zip(refs, self._tokenize_refs(refs)):
            if ex is None:
                raise ValueError(f"cannot restore pipeline state: example {list(ref)} (epoch, "
                                 f"index) is now dropped ({status}); did the source change?")
            row.append((ref, ex))
        return row

    def _next_example(self):
        """Next kept example and its ref, or None after the last epoch."""
        n = len(self._records)
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                return None
            if self._index >= n:
                if self._epoch_kept == 0:
                    st = self._pstats.tokenize
                    raise ValueError(f"every one of the {n} examples of process "
                                     f"{self.process_index}'s shard was dropped in epoch "
                                     f"{self._epoch} (dropped so far: {st.dropped})")
                self._epoch += 1
                self._index = 0
                self._epoch_kept = 0
                if self.epoch_boundary == "flush":
                    self._ready.extend(self._packer.flush())
                continue
            ref = (self._epoch, self._index)
            if ref not in self._lookahead:
                stop = min(n, self._index + self.tokenize_chunk)
                refs = [(self._epoch, j) for j in range(self._index, stop)]
                self._lookahead = dict(zip(refs, self._tokenize_refs(refs)))
            ex, status, n_cut = self._lookahead.pop(ref)
            self._index += 1
            self._pstats.tokenize.record(status, n_cut)
            if ex is None:
                continue
            self._epoch_kept += 1
            return ex, ref

    def _produce(self) -> Optional[Dict[str, np.ndarray]]:
        rows = []
        while len(rows) < self.local_batch:
            if self._ready:
                rows.append(self._ready.pop(0))
                continue
            if self._finished:
                break
            nxt = self._next_example()
            if nxt is None:
                self._ready.extend(self._packer.flush())
                self._finished = True
                continue
            ex, ref = nxt
            self._ready.extend(self._packer.add(ex, ref))
        if not rows or (len(rows) < self.local_batch and self.drop_remainder):
            return None
        built = [packing_lib.build_row([ex for _, ex in r], self.seq_len, self.pad_id)
                 for r in rows]
        batch = packing_lib.stack_rows(built, self.seq_len, self.local_batch, self.pad_id)
        st = self._pstats
        st.rows += len(rows)
        st.batches += 1
        st.tokens += int((batch["segment_ids"] != 0).sum())
        st.loss_tokens += int(batch["loss_mask"].sum())
        st.slots += batch["segment_ids"].size
        return batch

    # ------------------------------------------------------------------ prefetch thread
    def _start_thread(self):
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)

        def put(item):
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                while not self._stop.is_set():
                    batch = self._produce()
                    if batch is None:
                        put(("end",))
                        return
                    if not put(("batch", batch, self._snapshot())):
                        return
            except BaseException as e:  # re-raised in the consumer
                put(("error", e))

        self._thread = threading.Thread(target=work, name="sft-pipeline", daemon=True)
        self._thread.start()

    def _stop_thread(self, rewind: bool):
        """Stop the producer thread; with ``rewind`` move the producer back to the consumer's
        position (it may have prepared batches that were never returned)."""
        self._terminal = None
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None
        if rewind:
            self._restore(self._state)


# ============================================================================= global arrays
def make_global_array(local_batch, mesh, data_axes="data"):
    """Assemble each host's ``[global_batch / P, ...]`` slice into global ``jax.Array`` s sharded
    as ``PartitionSpec(data_axes, None)`` (batch over ``data_axes``, sequence replicated).

    ``local_batch`` is an array or a pytree (e.g. the batch dict); ``data_axes`` is a mesh axis
    name or a tuple of names (e.g. ``("data", "fsdp")``)."""

    def one(x):
        x = np.asarray(x)
        spec = PartitionSpec(data_axes, *([None] * (x.ndim - 1)))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree_util.tree_map(one, local_batch)
