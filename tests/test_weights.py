"""Weights files: exact round trips, atomic writes, and clear errors for every kind of bad file."""

import os
import stat
import zipfile

import numpy as np
import pytest

from mrcnn_edu import weights


def _state():
    return {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "f16": np.array([1.5, -2.25], dtype=np.float16),
        "f64": np.array(np.pi),  # 0-d
        "idx": np.array([[1, -2]], dtype=np.int64),
        "u8": np.array([0, 255], dtype=np.uint8),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }


def _assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_round_trip_preserves_values_dtypes_and_shapes(tmp_path):
    path = tmp_path / "w.npz"
    state = _state()
    weights.save(path, state)
    loaded = weights.load(path)
    assert set(loaded) == set(state)
    for key in state:
        _assert_same(loaded[key], state[key])


def test_python_scalars_and_strings_are_stored_without_pickle(tmp_path):
    path = tmp_path / "s.npz"
    weights.save(path, {"step": 1200, "lr": 0.02, "done": True, "name": "shapes-ñ"})
    loaded = weights.load(path)
    assert int(loaded["step"]) == 1200 and loaded["step"].dtype.kind == "i"
    assert float(loaded["lr"]) == 0.02
    assert bool(loaded["done"]) is True
    assert loaded["name"].dtype.kind == "U" and str(loaded["name"]) == "shapes-ñ"
    # and numpy's own loader, with pickle refused, reads the same file
    with np.load(path, allow_pickle=False) as npz:
        assert str(npz["name"]) == "shapes-ñ"


def test_nested_dicts_flatten_with_slash_and_come_back_nested(tmp_path):
    path = tmp_path / "ckpt.npz"
    state = {
        "model": {"backbone.conv1.weight": np.ones((2, 2), np.float32)},
        "optimizer": {"step": 3, "momentum_buffers": {"0": np.full(2, 0.5)}, "empty": {}},
        "rng": {"state": np.array([1, 2, 3], dtype=np.uint64)},
        "step": 3,
    }
    weights.save(path, state)
    flat = weights.load(path)
    assert set(flat) == {
        "model/backbone.conv1.weight",
        "optimizer/step",
        "optimizer/momentum_buffers/0",
        "rng/state",
        "step",
    }
    nested = weights.load(path, nested=True)
    _assert_same(nested["model"]["backbone.conv1.weight"], np.ones((2, 2), np.float32))
    _assert_same(nested["optimizer"]["momentum_buffers"]["0"], np.full(2, 0.5))
    _assert_same(nested["rng"]["state"], np.array([1, 2, 3], dtype=np.uint64))
    assert int(nested["optimizer"]["step"]) == 3 and int(nested["step"]) == 3
    assert "empty" not in nested["optimizer"]  # documented: empty groups store nothing


def test_keys_that_numpy_savez_would_take_as_its_own_arguments(tmp_path):
    path = tmp_path / "k.npz"
    weights.save(path, {"file": np.ones(1), "allow_pickle": np.zeros(1), "args": np.ones(2)})
    assert set(weights.load(path)) == {"file", "allow_pickle", "args"}


def test_compressed_round_trip(tmp_path):
    path = tmp_path / "c.npz"
    state = {"zeros": np.zeros((64, 64), np.float32)}
    weights.save(path, state, compress=True)
    _assert_same(weights.load(path)["zeros"], state["zeros"])
    assert os.path.getsize(path) < 64 * 64 * 4 / 10


def test_overwrite_replaces_the_old_file(tmp_path):
    path = tmp_path / "w.npz"
    weights.save(path, {"a": np.ones(3)})
    weights.save(path, {"b": np.zeros(2)})
    assert set(weights.load(path)) == {"b"}
    assert os.listdir(tmp_path) == ["w.npz"]


def test_saved_file_gets_the_usual_permissions(tmp_path):
    weights.save(tmp_path / "w.npz", {"a": np.ones(1)})
    (tmp_path / "plain").write_bytes(b"")
    mode = stat.S_IMODE(os.stat(tmp_path / "w.npz").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


# -- atomicity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_keeps_the_previous_file_and_leaves_no_temp_file(
    tmp_path, monkeypatch, error
):
    path = tmp_path / "w.npz"
    weights.save(path, {"good": np.arange(5)})
    calls = []

    def write_half_then_fail(f, arr, **kwargs):
        calls.append(1)
        f.write(b"\x93NUMPY partial")  # bytes reach the temp file before the failure
        raise error("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", write_half_then_fail)
    with pytest.raises(error, match="disk full"):
        weights.save(path, {"new": np.ones(1000)})
    monkeypatch.undo()
    assert calls, "the failure was injected into the write"
    _assert_same(weights.load(path)["good"], np.arange(5))
    assert os.listdir(tmp_path) == ["w.npz"]


def test_failure_at_rename_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        weights.save(tmp_path / "w.npz", {"a": np.ones(2)})
    assert os.listdir(tmp_path) == []


# -- what save refuses ----------------------------------------------------------------------------


def test_save_requires_the_npz_suffix_instead_of_appending_it(tmp_path):
    with pytest.raises(ValueError, match=r"must end in '\.npz'"):
        weights.save(tmp_path / "weights", {"a": np.ones(1)})
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.save(tmp_path / "nope" / "w.npz", {"a": np.ones(1)})


@pytest.mark.parametrize(
    "state, match",
    [
        ({}, "empty state"),
        ({"a": {}}, "empty state"),
        ({"a": None}, "NoneType"),
        ({"a": [1, "x", None]}, "object array"),
        ({"a": np.array([{}, 1], dtype=object)}, "object array"),
        ({1: np.ones(1)}, "not a valid name"),
        ({"a//b": np.ones(1)}, "not a valid name"),
        ({"": np.ones(1)}, "not a valid name"),
        ({"a/b": np.ones(1), "a": {"b": np.ones(1)}}, "collide"),
    ],
)
def test_save_rejects_what_cannot_be_stored_without_pickle(tmp_path, state, match):
    with pytest.raises(ValueError, match=match):
        weights.save(tmp_path / "w.npz", state)
    assert os.listdir(tmp_path) == []


# -- what load refuses ----------------------------------------------------------------------------


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        weights.load(path)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "w.npz"
    weights.save(path, _state())
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz.*truncated"):
        weights.load(cut)


def test_load_file_with_corrupted_array_bytes(tmp_path):
    path = tmp_path / "w.npz"
    weights.save(path, {"a": np.zeros(1000, np.float32)})
    data = bytearray(path.read_bytes())
    middle = data.index(b"\x00" * 400) + 200  # inside the array's payload
    data[middle : middle + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.npz.*corrupt"):
        weights.load(path)


def test_load_text_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"notes\.npz.*not a zip"):
        weights.load(path)


def test_load_plain_npy_file(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match=r"single \.npy array"):
        weights.load(path)


def test_load_zip_without_arrays(tmp_path):
    path = tmp_path / "foreign.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"foreign\.npz.*readme\.txt.*not \.npy"):
        weights.load(path)
    empty = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty, "w"):
        pass
    with pytest.raises(ValueError, match=r"empty\.npz.*no arrays"):
        weights.load(empty)


def test_load_refuses_object_arrays(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, ok=np.ones(2), bad=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz.*'bad'.*pickled object array"):
        weights.load(path)


def test_load_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        weights.load(tmp_path)


def test_load_nested_rejects_a_key_that_is_both_array_and_group(tmp_path):
    path = tmp_path / "clash.npz"
    np.savez(path, **{"a": np.ones(1), "a/b": np.ones(1)})
    assert set(weights.load(path)) == {"a", "a/b"}  # flat is fine
    with pytest.raises(ValueError, match="clash.npz"):
        weights.load(path, nested=True)
