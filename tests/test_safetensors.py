"""Our safetensors reader/writer against the format and against HF's own library.

HF's ``safetensors`` package is the reference: files must round-trip both
ways, and every corrupt file we build by hand must be refused by us (with a
one-line WeightsError naming the file) wherever HF's reader refuses it too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import require

import opswitch.model.safetensors as sf
from opswitch.core.errors import WeightsError
from opswitch.model.safetensors import SafetensorsFile, refuse_pickle, save_safetensors

NUMPY_DTYPES = ["?", "u1", "i1", "i2", "u2", "f2", "i4", "u4", "f4", "f8", "i8", "u8"]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "?":
        return rng.random(shape) < 0.5
    if dtype[0] == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def every_dtype() -> dict[str, np.ndarray]:
    tensors = {f"t_{np.dtype(d).name}": sample(d, (3, 5), i) for i, d in enumerate(NUMPY_DTYPES)}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    return tensors


def read_all(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {name: np.array(f.get(name)) for name in f.names}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype.newbyteorder("<"), name
        assert got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a, err_msg=name)


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_every_dtype(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = every_dtype()
    save_safetensors(path, tensors, metadata={"format": "pt", "note": "ünïcode"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "note": "ünïcode"}
        assert len(f) == len(tensors) and "t_float16" in f
        assert f.info("t_float16") == ("F16", (3, 5))
        assert f.info("scalar") == ("F32", ())
        a = f.get("t_float32")
        assert not a.flags.writeable and not a.flags.owndata  # a view of the mapping
        for name in f.names:  # HF's layout: every tensor aligned for its dtype
            assert f.get(name).ctypes.data % f.get(name).dtype.itemsize == 0
    assert_same(read_all(path), tensors)
    np.testing.assert_array_equal(a, tensors["t_float32"])  # still valid after close


def test_our_writer_hf_reader(tmp_path: Path) -> None:
    st_numpy = require("safetensors.numpy")
    path = tmp_path / "t.safetensors"
    tensors = every_dtype()
    save_safetensors(path, tensors)
    assert_same(st_numpy.load_file(path), tensors)


def test_hf_writer_our_reader(tmp_path: Path) -> None:
    st_numpy = require("safetensors.numpy")
    path = tmp_path / "t.safetensors"
    tensors = every_dtype()
    st_numpy.save_file(tensors, path, metadata={"format": "np"})
    assert_same(read_all(path), tensors)
    assert SafetensorsFile(path).metadata == {"format": "np"}


def test_bytes_identical_to_hf_writer(tmp_path: Path) -> None:
    """Same layout rules (descending item size, then name; 8-byte padded header)."""
    st_numpy = require("safetensors.numpy")
    tensors = {"b": sample("f4", (2, 3)), "a": sample("f2", (3,)), "c": sample("i8", (3,)),
               "d": sample("u1", (5,)), "e": np.array(3.0, np.float32), "z": np.zeros((0, 4), np.float32)}
    st_numpy.save_file(tensors, tmp_path / "hf.safetensors", metadata={"format": "pt"})
    save_safetensors(tmp_path / "our.safetensors", tensors, metadata={"format": "pt"})
    assert (tmp_path / "our.safetensors").read_bytes() == (tmp_path / "hf.safetensors").read_bytes()


def test_writer_normalises_layout(tmp_path: Path) -> None:
    """Big-endian and non-contiguous arrays are written as little-endian C order."""
    path = tmp_path / "t.safetensors"
    big = np.arange(12, dtype=">f4").reshape(3, 4)
    save_safetensors(path, {"big": big, "transposed": big.T, "list": [[1.0, 2.0]]})
    got = read_all(path)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["transposed"], big.T)
    assert got["list"].dtype == np.float64


def test_float_conversions_are_exact(tmp_path: Path) -> None:
    torch = require("torch")
    st_torch = require("safetensors.torch")
    path = tmp_path / "t.safetensors"
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 9, generator=g) * 1e3
    tensors = {"bf16": base.to(torch.bfloat16), "f16": base.to(torch.float16),
               "f32": base, "f64": base.to(torch.float64), "i64": torch.arange(4)}
    st_torch.save_file(tensors, path)
    with SafetensorsFile(path) as f:
        assert f.info("bf16") == ("BF16", (7, 9))
        for name in ("bf16", "f16", "f32", "f64"):
            got = f.get_float32(name)
            assert got.dtype == np.float32 and not got.flags.writeable
            np.testing.assert_array_equal(got, tensors[name].float().numpy(), err_msg=name)
        np.testing.assert_array_equal(f.get("i64"), np.arange(4))
        with pytest.raises(WeightsError, match=r"'i64' is I64, not a float tensor"):
            f.get_float32("i64")
        with pytest.raises(WeightsError, match="get_float32"):
            f.get("bf16")  # numpy has no bfloat16
        with pytest.raises(WeightsError, match="no tensor 'nope'"):
            f.get("nope")


def test_bfloat16_arrays_from_ml_dtypes_are_written(tmp_path: Path) -> None:
    ml_dtypes = require("ml_dtypes")
    st_torch = require("safetensors.torch")
    path = tmp_path / "t.safetensors"
    values = sample("f4", (4, 3)).astype(ml_dtypes.bfloat16)
    save_safetensors(path, {"w": values})
    assert SafetensorsFile(path).info("w") == ("BF16", (4, 3))
    np.testing.assert_array_equal(SafetensorsFile(path).get_float32("w"), values.astype(np.float32))
    np.testing.assert_array_equal(st_torch.load_file(path)["w"].float().numpy(), values.astype(np.float32))


def test_closed_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"x": np.ones(3, np.float32)})
    f = SafetensorsFile(path)
    f.close()
    f.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        f.get("x")


_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
_ARRAYS = st.sampled_from(NUMPY_DTYPES).flatmap(lambda d: hnp.arrays(d, _SHAPES))
_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__"
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(_NAMES, _ARRAYS, max_size=5))
def test_round_trip_property(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    st_numpy = require("safetensors.numpy")
    path = tmp_path / "prop.safetensors"
    save_safetensors(path, tensors)
    assert_same(read_all(path), tensors)
    assert_same(st_numpy.load_file(path), tensors)


# -- corrupt files -------------------------------------------------------------------------


def raw_file(header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> bytes:
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


CORRUPT = {
    "empty file": b"",
    "shorter than 8 bytes": b"\x08\x00\x00",
    "header length past EOF": struct.pack("<Q", 100) + b"{}",
    "absurd header length": struct.pack("<Q", 2**40) + b"{}" + b" " * 64,
    "header not UTF-8": raw_file(None, header_bytes=b'{"\xff\xfe":1}'),
    "header not JSON": raw_file(None, header_bytes=b"{not json"),
    "header not an object": raw_file([1, 2]),
    "entry not an object": raw_file({"x": 3}),
    "entry lacks dtype": raw_file({"x": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "entry lacks data_offsets": raw_file({"x": {"dtype": "F32", "shape": [1]}}, bytes(4)),
    "shape not a list": raw_file({"x": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, bytes(4)),
    "shape of floats": raw_file({"x": f32([1.0], 0, 4)}, bytes(4)),  # type: ignore[list-item]
    "dtype not a string": raw_file({"x": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "unknown dtype": raw_file({"x": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "negative dimension": raw_file({"x": f32([-1], 0, 4)}, bytes(4)),
    "one offset": raw_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, bytes(4)),
    "negative offset": raw_file({"x": f32([1], -4, 0)}, bytes(4)),
    "offsets past the data": raw_file({"x": f32([4], 0, 16)}, bytes(8)),
    "begin after end": raw_file({"x": f32([1], 8, 4)}, bytes(8)),
    "size != shape * itemsize": raw_file({"x": f32([3], 0, 8)}, bytes(8)),
    "overlapping tensors": raw_file({"x": f32([2], 0, 8), "y": f32([1], 4, 8)}, bytes(8)),
    "gap between tensors": raw_file({"x": f32([1], 0, 4), "y": f32([1], 8, 12)}, bytes(12)),
    "trailing bytes": raw_file({"x": f32([2], 0, 8)}, bytes(12)),
    "metadata not strings": raw_file({"__metadata__": {"n": 1}, "x": f32([1], 0, 4)}, bytes(4)),
    "duplicate tensor name": raw_file(
        None, bytes(4), header_bytes=b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    ),
}
HF_ACCEPTS = {"duplicate tensor name"}  # serde keeps the last entry; we refuse the ambiguity


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "broken-model.safetensors"
    path.write_bytes(CORRUPT[case])
    with pytest.raises(WeightsError) as err:
        SafetensorsFile(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "re-download or re-save" in message or "re-save the file" in message
    st_numpy = require("safetensors.numpy")
    if case not in HF_ACCEPTS:  # our checks are no looser than the reference's
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            st_numpy.load_file(path)


def test_truncated_real_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_safetensors(path, every_dtype())
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(WeightsError, match=r"past the \d+-byte data section"):
        SafetensorsFile(path)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"missing\.safetensors does not exist"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="is a directory, not a file"):
        SafetensorsFile(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_bytes_never_escape_as_tracebacks(tmp_path: Path, data: st.DataObject) -> None:
    """Flip, cut or extend a valid file anywhere: it loads, or fails with WeightsError."""
    good = raw_file({"__metadata__": {"k": "v"}, "a": f32([2, 2], 0, 16), "b": f32([1], 16, 20)}, bytes(20))
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(0, len(blob)))] + data.draw(st.binary(max_size=8))
    path = tmp_path / "mangled.safetensors"
    path.write_bytes(bytes(blob))
    try:
        with SafetensorsFile(path) as f:
            for name in f.names:
                f.get(name)
    except WeightsError as e:
        assert str(path) in str(e)


# -- saving --------------------------------------------------------------------------------


class Unconvertible:
    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise RuntimeError("device lost")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_failed_conversion_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(WeightsError, match=r"tensor 'bad' \(Unconvertible\) is not an array"):
        save_safetensors(path, {"good": np.zeros(3, np.float32), "bad": Unconvertible()})
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_failure_mid_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": np.ones(2, np.float32)})
    before = path.read_bytes()
    written: list[int] = []

    def disk_fills_up(f, a):  # the second tensor hits a full disk
        if written:
            raise OSError(28, "No space left on device")
        written.append(a.nbytes)
        f.write(a.tobytes())

    monkeypatch.setattr(sf, "_write_tensor", disk_fills_up)
    with pytest.raises(WeightsError, match=r"cannot write .*model\.safetensors: No space left on device"):
        save_safetensors(path, {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)})
    assert written and path.read_bytes() == before and leftovers(tmp_path) == []


def test_save_refuses_what_safetensors_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    with pytest.raises(WeightsError, match="complex64"):
        save_safetensors(path, {"z": np.zeros(2, np.complex64)})
    with pytest.raises(WeightsError, match="__metadata__"):
        save_safetensors(path, {"__metadata__": np.zeros(2)})
    with pytest.raises(WeightsError, match="metadata must map strings to strings"):
        save_safetensors(path, {}, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="cannot write"):
        save_safetensors(tmp_path / "no" / "such" / "dir.safetensors", {})
    assert not path.exists()


def test_empty_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {})
    assert path.read_bytes() == b"\x08" + bytes(7) + b"{}      "  # HF's own bytes for no tensors
    assert SafetensorsFile(path).names == []


# -- pickles -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "w.PTH", "last.ckpt", "x.pkl"])
def test_refuse_pickle(tmp_path: Path, name: str) -> None:
    with pytest.raises(WeightsError) as err:
        refuse_pickle(tmp_path / name)
    message = str(err.value)
    assert "arbitrary code" in message and "safe_serialization=True" in message and "\n" not in message
    assert str(tmp_path) in message


def test_refuse_pickle_lets_safetensors_pass(tmp_path: Path) -> None:
    refuse_pickle(tmp_path / "model.safetensors")
