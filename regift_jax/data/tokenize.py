"""SFT tokenization with loss masks (prompt tokens masked out, response tokens trained).

Design
------
* **Prompt/response boundary** (``boundary=``).  ``"separate"``: the prompt and the response are
  tokenized *separately*, each without special tokens, and concatenated as
  ``[BOS] + prompt_ids + response_ids + [EOS]``.  The loss mask is 1 exactly on ``response_ids``
  and the final EOS, 0 on BOS and the prompt.  This has two properties we want:

  1. the prompt tokens are byte-for-byte the tokens the model sees at inference time, where the
     prompt alone is tokenized and the model continues it (training/inference consistency);
  2. the mask boundary is always a token boundary; no token mixes prompt and response characters.

  The price is that a BPE merge *across* the boundary is never formed.  The ReGiFT templates end
  the prompt with ``"### Response:\n"`` and start the response with ``"<think>"``; no merge
  crosses a newline in byte-level BPE (SmolLM2, Llama-3, Qwen2, Phi-4), so there separate ==
  joint tokenization (checked in ``tests/test_tokenize.py``).

  SentencePiece-style tokenizers (Llama-2, Mistral-7B-v0.1, Phi-3) prepend a dummy space to any
  text tokenized on its own, so a separately tokenized response would start with a spurious
  ``"▁<"`` the model never produces after the prompt.  For them ``"joint"`` tokenizes
  ``prompt + response`` once and splits by character offsets: tokens lying entirely in the
  prompt are the (masked) prompt, every later token is trained (a token straddling the boundary
  counts as response).  ``"auto"`` (default) picks ``"joint"`` iff the tokenizer prepends a space
  (:func:`tokenizer_prepends_space`), else ``"separate"``.

* **Response parts.**  A response is either a plain string or a sequence of :class:`Piece`
  ``(text, role)`` with role ``"reasoning"``, ``"answer"`` or ``"text"`` (template glue).
  :func:`response_pieces` renders ``<think> R </think>\\n<answer> A </answer>``-style templates into
  pieces.  The response is tokenized *as one string* (so its tokens are exactly what a model that
  writes that text would produce); the pieces only define which character span is reasoning.

* **Overlong examples.**  ``overlong="drop"`` drops any example longer than ``max_len`` tokens
  (reason ``"overlong"``).  ``overlong="truncate_reasoning"`` removes tokens from the *end of the
  reasoning span* until the example fits; the prompt, the template glue and the answer are never
  cut.  A token is cuttable iff its character offsets lie entirely inside the reasoning span (a
  token straddling the span edge, e.g. ``" The"`` whose space belongs to the template, is kept),
  and the cut never splits a character that byte-level BPE spread over several tokens (it may then
  cut one or two tokens more than strictly needed).
  If even removing every cuttable token is not enough, the example is dropped with reason
  ``"overlong_untruncatable"`` (a plain-string response has no reasoning span: reason
  ``"overlong"``).  Truncation requires a fast (Rust) tokenizer, which returns offsets.

* **Special tokens.**  The prompt's BOS follows the one rule of
  :func:`regift_jax.core.prompts.encode_prompt`, which evaluation and trace generation use too:
  ``add_bos=None`` follows the tokenizer's own convention (BOS is added iff ``tokenizer(text)``
  adds it, e.g. Llama-3 yes, SmolLM2/Qwen2 no); ``True``/``False`` force it; a prompt whose text
  already starts with BOS (a chat template that writes it) never gets a second one.
  ``add_eos=True`` appends ``eos_id`` (default ``tokenizer.eos_token_id``) so the model learns to
  stop; pass the chat end-of-turn id (e.g. Llama-3 ``<|eot_id|>``) explicitly if that is the stop
  token used at inference.

* **Statistics.**  :class:`TokenizeStats` counts kept, truncated and dropped (by reason) examples
  and truncated tokens; :class:`SFTTokenizer` updates one as it goes.  Nothing is dropped silently.

Returned examples are ``{"input_ids": int32[n], "loss_mask": int32[n]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from regift_jax.core import prompts

OVERLONG_MODES = ("drop", "truncate_reasoning")
BOUNDARY_MODES = ("auto", "separate", "joint")
ROLES = ("text", "reasoning", "answer")

# Drop reasons (the status string returned instead of an example).
DROP_OVERLONG = "overlong"
DROP_UNTRUNCATABLE = "overlong_untruncatable"
DROP_EMPTY_RESPONSE = "empty_response"
# Kept statuses.
KEPT = "ok"
TRUNCATED = "truncated"

DEFAULT_RESPONSE_TEMPLATE = "<think> {reasoning} </think>\n<answer> {answer} </answer>"


class Piece(NamedTuple):
    """A span of response text and its role: ``"text"``, ``"reasoning"`` or ``"answer"``."""
    text: str
    role: str = "text"


Response = Union[str, Sequence[Piece], Sequence[Tuple[str, str]]]


def response_pieces(reasoning: Optional[str], answer: str,
                    template: str = DEFAULT_RESPONSE_TEMPLATE) -> Tuple[Piece, ...]:
    """Render a response template with ``{reasoning}`` and ``{answer}`` placeholders into pieces.

    Each placeholder may occur at most once, in any order; ``{answer}`` is required.  A template
    without ``{reasoning}`` (e.g. the instruction baseline ``"<answer> {answer} </answer>"``)
    requires ``reasoning`` to be ``None`` or empty, so no text is ever dropped silently.  Any other
    template text becomes ``"text"`` pieces; braces other than the two placeholders are literal
    (the template is not passed through ``str.format``).
    """
    marks = {"{answer}": ("answer", answer)}
    if "{reasoning}" in template:
        marks["{reasoning}"] = ("reasoning", "" if reasoning is None else reasoning)
    elif reasoning:
        raise ValueError(f"response template has no {{reasoning}} placeholder but a non-empty "
                         f"reasoning was given: {template!r}")
    for m in ("{reasoning}", "{answer}"):
        if template.count(m) > 1 or (m == "{answer}" and m not in template):
            raise ValueError(f"response template must contain {m} exactly once: {template!r}")
    order = sorted(marks, key=template.index)
    pieces: List[Piece] = []
    rest = template
    for m in order:
        head, rest = rest.split(m, 1)
        if head:
            pieces.append(Piece(head, "text"))
        role, value = marks[m]
        pieces.append(Piece(value, role))
    if rest:
        pieces.append(Piece(rest, "text"))
    return tuple(pieces)


def join_response(response: Response) -> Tuple[str, Optional[Tuple[int, int]]]:
    """``(full_text, reasoning_char_span or None)`` of a response string or piece sequence."""
    if isinstance(response, str):
        return response, None
    text_parts: List[str] = []
    span = None
    pos = 0
    for p in response:
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                and p[1] in ROLES):
            raise TypeError(f"response piece must be (text: str, role in {ROLES}), got {p!r}")
        text, role = p
        if role == "reasoning":
            if span is not None:
                raise ValueError("a response may contain at most one reasoning piece")
            span = (pos, pos + len(text))
        text_parts.append(text)
        pos += len(text)
    return "".join(text_parts), span


@dataclasses.dataclass
class TokenizeStats:
    """Counters of what happened to examples during tokenization (JSON-friendly)."""
    seen: int = 0
    kept: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)

    def record(self, status: str, n_cut: int = 0) -> None:
        self.seen += 1
        if status in (KEPT, TRUNCATED):
            self.kept += 1
            if status == TRUNCATED:
                self.truncated += 1
                self.truncated_tokens += int(n_cut)
        else:
            self.dropped[status] = self.dropped.get(status, 0) + 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TokenizeStats":
        return cls(seen=int(d["seen"]), kept=int(d["kept"]), truncated=int(d["truncated"]),
                   truncated_tokens=int(d["truncated_tokens"]),
                   dropped={str(k): int(v) for k, v in d["dropped"].items()})


def tokenizer_prepends_space(tokenizer) -> bool:
    """Whether text tokenized on its own gets a dummy leading space (SentencePiece-style
    ``add_dummy_prefix`` / Metaspace ``prepend_scheme``: Llama-2, Mistral-7B-v0.1, Phi-3), i.e.
    ``ids("\\n") + ids("x") != ids("\\nx")`` although no merge can cross a newline."""
    def ids(t):
        return list(tokenizer(t, add_special_tokens=False)["input_ids"])
    return ids("\n") + ids("x") != ids("\nx")


class SFTTokenizer:
    """Turns ``(prompt, response)`` pairs into masked token arrays.  See the module docstring.

    Args:
      tokenizer: a Hugging Face tokenizer (``__call__`` with ``add_special_tokens``; a fast one for
        ``overlong="truncate_reasoning"``).
      max_len: the maximum example length in tokens, BOS and EOS included (the packed row length).
      overlong: ``"drop"`` or ``"truncate_reasoning"``.
      add_bos: ``None`` (follow the tokenizer), ``True`` or ``False``.
      boundary: ``"separate"``, ``"joint"`` or ``"auto"`` (see the module docstring); the
        resolved mode is ``self.boundary``.
      add_eos: append ``eos_id`` (trained, loss mask 1).
      eos_id / bos_id: override the tokenizer's ids.
      stats: a :class:`TokenizeStats` to update (a fresh one by default).
    """

    def __init__(self, tokenizer, max_len: int, overlong: str = "drop",
                 add_bos: Optional[bool] = None, add_eos: bool = True,
                 eos_id: Optional[int] = None, bos_id: Optional[int] = None,
                 boundary: str = "auto", stats: Optional[TokenizeStats] = None):
        if overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
        if boundary == "auto":
            boundary = "joint" if tokenizer_prepends_space(tokenizer) else "separate"
        self.boundary = boundary
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.overlong = overlong
        if add_bos is None:
            add_bos = prompts.tokenizer_adds_bos(tokenizer)
        self.bos_id = None
        if add_bos:
            self.bos_id = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
            if self.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token_id; pass bos_id")
            self.bos_id = int(self.bos_id)
        self.eos_id = None
        if add_eos:
            self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
            if self.eos_id is None:
                raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass eos_id")
        self.stats = stats if stats is not None else TokenizeStats()

    # ------------------------------------------------------------------ encoding
    def _encode(self, texts: List[str], offsets: bool):
        out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        ids = [list(x) for x in out["input_ids"]]
        if not offsets:
            return ids, None
        return ids, [list(map(tuple, o)) for o in out["offset_mapping"]]

    def __call__(self, prompt: str, response: Response):
        """Tokenize one example: ``(example dict, status)``; example is ``None`` when dropped."""
        return self.batch([(prompt, response)])[0]

    def batch(self, pairs: Sequence[Tuple[str, Response]]):
        """Tokenize a list of ``(prompt, response)`` pairs in one tokenizer call (faster).

        Returns a list of ``(example or None, status)`` in input order and updates ``stats``.
        """
        results = []
        for ex, status, n_cut in self.encode_batch(pairs):
            self.stats.record(status, n_cut)
            results.append((ex, status))
        return results

    def encode_batch(self, pairs: Sequence[Tuple[str, Response]]):
        """Like :meth:`batch` but returns ``(example or None, status, n_tokens_cut)`` triples and
        does *not* update ``stats`` (for callers that count at consumption time)."""
        prompts, texts, spans = [], [], []
        for i, (prompt, response) in enumerate(pairs):
            if not isinstance(prompt, str):
                raise TypeError(f"pair {i}: prompt must be a str, got {type(prompt).__name__}")
            text, span = join_response(response)
            prompts.append(prompt)
            texts.append(text)
            spans.append(span)
        if not pairs:
            return []
        if self.boundary == "joint":
            ids, off = self._encode([p + t for p, t in zip(prompts, texts)], True)
            p_ids, r_ids, r_off = [], [], []
            for prompt, x, o in zip(prompts, ids, off):
                n = len(prompt)
                k = 0  # tokens entirely inside the prompt form a prefix (offsets are monotonic)
                while k < len(x) and o[k][1] <= n:
                    k += 1
                p_ids.append(x[:k])
                r_ids.append(x[k:])
                r_off.append([(a - n, b - n) for a, b in o[k:]])
        else:
            want_offsets = self.overlong == "truncate_reasoning"
            p_ids, _ = self._encode(prompts, False)
            r_ids, r_off = self._encode(texts, want_offsets)
        return [self._assemble(p_ids[i], r_ids[i], r_off[i] if r_off is not None else None,
                               spans[i]) for i in range(len(pairs))]

    def _assemble(self, p_ids, r_ids, r_off, span):
        if not r_ids:
            return None, DROP_EMPTY_RESPONSE, 0
        p_ids = prompts.with_bos(p_ids, self.bos_id)
        total = len(p_ids) + len(r_ids) + (self.eos_id is not None)
        excess = total - self.max_len
        status, n_cut = KEPT, 0
        if excess > 0:
            if self.overlong == "drop" or span is None:
                return None, DROP_OVERLONG, 0
            # Cuttable tokens: offsets entirely inside the reasoning span; they are contiguous.
            lo, hi = span
            inside = [j for j, (a, b) in enumerate(r_off) if a >= lo and b <= hi and b > a]
            if len(inside) < excess:
                return None, DROP_UNTRUNCATABLE, 0
            end = inside[-1] + 1
            cut = end - excess
            # Never split a character: byte-level BPE may spread one character over several
            # tokens that share its offsets; cut before the first of them.
            while cut > inside[0] and r_off[cut - 1][1] > r_off[cut][0]:
                cut -= 1
            r_ids = r_ids[:cut] + r_ids[end:]
            status, n_cut = TRUNCATED, end - cut
        ids = list(p_ids)
        n_masked = len(ids)
        ids += list(r_ids)
        if self.eos_id is not None:
            ids.append(self.eos_id)
        mask = np.zeros(len(ids), np.int32)
        mask[n_masked:] = 1
        return {"input_ids": np.asarray(ids, np.int32), "loss_mask": mask}, status, n_cut


def tokenize_example(tokenizer, prompt: str, response: Response, max_len: int,
                     overlong: str = "drop", add_bos: Optional[bool] = None,
                     add_eos: bool = True, eos_id: Optional[int] = None,
                     boundary: str = "auto", stats: Optional[TokenizeStats] = None):
    """One-shot convenience wrapper around :class:`SFTTokenizer`: ``(example or None, status)``.

    ``status`` is ``"ok"``, ``"truncated"`` or a drop reason (``"overlong"``,
    ``"overlong_untruncatable"``, ``"empty_response"``).  For many examples build one
    :class:`SFTTokenizer` and call :meth:`SFTTokenizer.batch` (the BOS probe runs once).
    """
    tok = SFTTokenizer(tokenizer, max_len, overlong=overlong, add_bos=add_bos, add_eos=add_eos,
                       eos_id=eos_id, boundary=boundary, stats=stats)
    return tok(prompt, response)


def tokenize_examples(tokenizer, pairs: Iterable[Tuple[str, Response]], max_len: int,
                      chunk: int = 256, **kw):
    """Tokenize an iterable of pairs; returns ``(kept examples list, TokenizeStats)``."""
    tok = SFTTokenizer(tokenizer, max_len, **kw)
    kept, buf = [], []

    def flush():
        for ex, _ in tok.batch(buf):
            if ex is not None:
                kept.append(ex)
        buf.clear()

    for pair in pairs:
        buf.append(pair)
        if len(buf) >= chunk:
            flush()
    flush()
    return kept, tok.stats
