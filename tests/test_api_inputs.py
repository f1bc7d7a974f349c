"""The Python API validates what it is given: ids, settings, backends, dtypes.

Every wrong input is an OpswitchError naming what is wrong — never a wrapped
index, a silently truncated float, or a numpy exception.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

import opswitch
from opswitch.core.errors import GenerationError, ModelInputError, OpswitchError


@pytest.fixture(scope="module")
def lm():
    return opswitch.load_model(None, "blas")


@pytest.mark.parametrize(
    "ids, message",
    [
        ([1, 2, -1], "token id -1 is outside"),
        ([1, 99999], "token id 99999 is outside"),
        ([1.7, 2.2], "must be a sequence of integers"),
        (["1", "2"], "must be a sequence of integers"),
        ([[1, 2], [3, 4]], "must be a sequence of integers"),
        ([True, False], "must be a sequence of integers"),
    ],
)
def test_bad_ids_are_refused_everywhere(lm, ids, message):
    for call in (lm.loss, lm.forward, lm.generate_ids, lm.perplexity):
        with pytest.raises(ModelInputError, match=message):
            call(ids)


def test_numpy_integers_are_ids_like_python_ones(lm):
    ids = lm.encode("It is a truth universally")
    as_numpy = np.array(ids, dtype=np.int32)
    assert lm.loss(as_numpy) == pytest.approx(lm.loss(ids))
    assert lm.loss([np.int64(i) for i in ids]) == pytest.approx(lm.loss(ids))


def test_unknown_settings_and_bad_arguments_name_the_argument(lm):
    with pytest.raises(GenerationError, match="unknown generation setting 'temprature'"):
        lm.generate("Hi", temprature=0.5)
    with pytest.raises(OpswitchError, match="backend must be a name"):
        lm.to(5)
    with pytest.raises(OpswitchError, match="dtype must be a string"):
        lm.to("naive", dtype=5)
    with pytest.raises(OpswitchError, match="computes in float32, float64, not float16"):
        opswitch.load_model(None, "naive", dtype="float16")
    with pytest.raises(OpswitchError, match="unknown weight format 'int4'"):
        opswitch.load_model(None, "naive", weights="int4")


def test_the_same_spec_spelling_in_the_api(lm):
    wide = opswitch.load_model(None, "naive:float64")
    assert wide.backend.dtype == np.float64 and wide.backend.spec == "naive:float64"
    assert opswitch.load_model(None, "blas:float64").backend.dtype == np.float64


def test_moving_a_model_while_it_generates_is_refused(lm):
    stream = lm.stream("It is a truth", max_new_tokens=50, temperature=0)
    next(stream)
    with pytest.raises(OpswitchError, match="while 1 generation"):
        lm.to("naive")
    stream.close()
    lm.to("naive")
    lm.to("blas")


def test_threads_share_a_model_for_generation():
    lm = opswitch.load_model(None, "opencl")  # its ops are not thread-safe: the model serialises them
    expected = lm.generate("It is a truth", max_new_tokens=12, temperature=0)
    results, errors = [], []

    def work():
        try:
            results.append(lm.generate("It is a truth", max_new_tokens=12, temperature=0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 4


def test_a_padded_vocabulary_is_masked_not_fatal(tmp_path):
    """A model vocabulary larger than the tokenizer's: ids past the tokenizer are never sampled."""
    import shutil

    from opswitch.model.weights import load_gpt2, save_gpt2

    demo = opswitch.load_model(None, "naive")
    config, params = load_gpt2(demo.source)
    padded = dataclasses.replace(config, vocab_size=config.vocab_size + 64)
    extra = np.zeros((64, config.n_embd), dtype=np.float32)
    extra[:] = 5.0 * params["ln_f"]["bias"]  # padding rows that would win every argmax
    params["wte"] = np.concatenate([params["wte"], extra])
    save_gpt2(tmp_path, padded, params, overwrite=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(f"{demo.source}/{name}", tmp_path / name)
    lm = opswitch.load_model(tmp_path, "naive")
    assert any("larger than its tokenizer's" in note for note in lm.notes)
    result = lm.generate_ids("It is", max_new_tokens=20, temperature=0.9, seed=3, stop_token=-1)
    assert len(result.new_ids) == 20 and max(result.new_ids) < config.vocab_size
    assert isinstance(lm.generate("It is", max_new_tokens=5, temperature=0), str)


def test_a_model_directory_with_a_char_tokenizer_loads_it(tmp_path, tiny_config, tiny_params):
    """load_model(dir) finds the tokenizer load_tokenizer(dir) finds, whichever files make it;
    and a directory with only half of a BPE pair is an error naming the missing file, not a
    model that silently has no tokenizer."""
    from opswitch.core.errors import TokenizerError
    from opswitch.model.weights import save_gpt2
    from opswitch.tokenizer import CharTokenizer, load_tokenizer

    save_gpt2(tmp_path, tiny_config, tiny_params, overwrite=True)
    CharTokenizer.from_text("abcdefgh ").save(tmp_path / "tokenizer_char.json")
    lm = opswitch.load_model(tmp_path, "naive")
    assert isinstance(lm.tokenizer, CharTokenizer)
    assert lm.tokenizer.chars == load_tokenizer(tmp_path).chars
    assert isinstance(lm.generate("abc", max_new_tokens=3, temperature=0), str)
    (tmp_path / "tokenizer_char.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.json"):
        opswitch.load_model(tmp_path, "naive")
