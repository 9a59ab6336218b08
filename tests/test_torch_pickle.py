"""The torch-free ``.pth`` reader: hand-built files whose contents follow from their bytes,
malicious pickles that must be refused without running, damaged files, and (when torch is
installed) every dtype/view/format torch writes, compared with ``tensor.numpy()``."""

import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from mrcnn_edu.torch_pickle import (
    LEGACY_MAGIC_NUMBER,
    load_torch_file,
    read_state_dict,
    unwrap_state_dict,
)

# -- a tiny pickle assembler (protocol 2 opcodes), so files can be built without torch ----------


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
    return b"J" + struct.pack("<i", i)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _call(func, *args):
    return func + _tuple(*args) + b"R"


def _storage(key, cls, numel, legacy=False):
    parts = [_str("storage"), _global("torch", cls), _str(key), _str("cpu"), _int(numel)]
    return _tuple(*parts, *([b"N"] if legacy else [])) + b"Q"  # BINPERSID


def _tensor(storage, offset, size, stride):
    hooks = _call(_global("collections", "OrderedDict"))
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        storage,
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # False: requires_grad
        hooks,
    )


def _state_pickle(entries):
    """An OrderedDict {name: tensor} as torch writes it: REDUCE then SETITEMS."""
    body = b"".join(_str(k) + v for k, v in entries.items())
    return b"\x80\x02" + _call(_global("collections", "OrderedDict")) + b"(" + body + b"u."


def _write_zip(path, pkl, storages, byteorder=b"little", prefix="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return str(path)


def _legacy_bytes(pkl, storages):
    """storages: [(key, numel, raw bytes)] in file order."""
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            LEGACY_MAGIC_NUMBER,
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
        )
    )
    tail = pickle.dumps([k for k, _, _ in storages], protocol=2)
    data = b"".join(struct.pack("<q", n) + raw for _, n, raw in storages)
    return head + pkl + tail + data


def _write_legacy(path, pkl, storages):
    path.write_bytes(_legacy_bytes(pkl, storages))
    return str(path)


STORAGE12 = np.arange(12, dtype="<f4")  # values 0..11: an element's value is its index


def _strided_entries(legacy=False):
    s = _storage("0", "FloatStorage", 12, legacy)
    return {
        "t": _tensor(s, 1, (3, 2), (1, 3)),  # element (i, j) = storage[1 + i + 3 j]
        "row": _tensor(s, 6, (4,), (1,)),  # the same storage again (shared)
        "scalar": _tensor(s, 11, (), ()),
        "empty": _tensor(s, 0, (0, 5), (5, 1)),
    }


def _check_strided(sd):
    expected_t = np.array([[1 + i + 3 * j for j in range(2)] for i in range(3)], np.float32)
    np.testing.assert_array_equal(sd["t"], expected_t)
    np.testing.assert_array_equal(sd["row"], [6, 7, 8, 9])
    assert sd["scalar"].shape == () and float(sd["scalar"]) == 11.0
    assert sd["empty"].shape == (0, 5)
    for a in sd.values():
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable


def test_hand_built_zip_file_rebuilds_strided_shared_scalar_and_empty_tensors(tmp_path):
    pkl = _state_pickle(_strided_entries())
    path = _write_zip(tmp_path / "w.pth", pkl, {"0": STORAGE12.tobytes()})
    sd = read_state_dict(path)
    assert list(sd) == ["t", "row", "scalar", "empty"]
    _check_strided(sd)
    sd["row"][0] = -1  # a copy: shared storages do not alias after reading
    assert sd["t"][2, 1] == 6


def test_hand_built_legacy_stream_rebuilds_the_same(tmp_path):
    pkl = _state_pickle(_strided_entries(legacy=True))
    path = _write_legacy(tmp_path / "w.pth", pkl, [("0", 12, STORAGE12.tobytes())])
    _check_strided(read_state_dict(path))


def test_zip_byteorder_big_is_honoured(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=">f4")
    pkl = _state_pickle({"w": _tensor(_storage("0", "FloatStorage", 3), 0, (3,), (1,))})
    path = _write_zip(tmp_path / "b.pth", pkl, {"0": values.tobytes()}, byteorder=b"big")
    out = read_state_dict(path)["w"]
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, [1.5, -2.0, 3.25])


def test_bfloat16_is_widened_exactly_to_float32(tmp_path):
    # bfloat16 words: 1.0 = 0x3F80, -2.5 = 0xC020, 2**-10 = 0x3A80 (the top half of a float32)
    words = np.array([0x3F80, 0xC020, 0x3A80], dtype="<u2")
    pkl = _state_pickle({"w": _tensor(_storage("0", "BFloat16Storage", 3, True), 0, (3,), (1,))})
    path = _write_legacy(tmp_path / "bf.pth", pkl, [("0", 3, words.tobytes())])
    out = read_state_dict(path)["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, -2.5, 2.0**-10])


# -- malicious and damaged files ------------------------------------------------------------


class _RunsShell:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refused_name():
    return f"{os.system.__module__}.system"  # "posix.system" on Linux


def test_the_attack_pickle_really_runs_code_under_plain_pickle(tmp_path):
    # The control: a plain pickle.loads of these bytes does create the marker, so the tests
    # below, where the marker must stay absent, test something real.
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsShell(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("container", ["zip", "legacy", "bare"])
def test_code_running_pickle_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _RunsShell(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        _write_zip(path, evil, {})
    elif container == "legacy":
        _write_legacy(path, evil, [])
    else:
        path.write_bytes(evil)
    with pytest.raises(ValueError) as err:
        load_torch_file(path)
    msg = str(err.value)
    assert _refused_name() in msg and "not be a plain state dict" in msg and str(path) in msg
    assert not marker.exists()


def test_hand_written_opcodes_calling_eval_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w')"
    evil = b"\x80\x02" + _call(_global("builtins", "eval"), _str(code)) + b"."
    path = _write_zip(tmp_path / "e.pth", evil, {})
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        load_torch_file(path)
    assert not marker.exists()


def test_a_global_hidden_inside_a_storage_id_is_refused(tmp_path):
    bad_storage = _tuple(
        _str("storage"), _global("subprocess", "Popen"), _str("0"), _str("cpu"), _int(1)
    )
    pkl = _state_pickle({"w": _tensor(bad_storage + b"Q", 0, (1,), (1,))})
    path = _write_zip(tmp_path / "p.pth", pkl, {"0": b"\0" * 4})
    with pytest.raises(ValueError, match=r"subprocess\.Popen"):
        load_torch_file(path)


def test_persistent_ids_other_than_storages_are_refused(tmp_path):
    pkl = b"\x80\x02" + _tuple(_str("module"), _str("x")) + b"Q."
    path = _write_zip(tmp_path / "m.pth", pkl, {})
    with pytest.raises(ValueError, match="only storages"):
        load_torch_file(path)


def test_a_view_reaching_past_its_storage_is_refused(tmp_path):
    # Without the bounds check, as_strided would read memory outside the storage.
    pkl = _state_pickle({"w": _tensor(_storage("0", "FloatStorage", 4), 2, (10,), (1,))})
    path = _write_zip(tmp_path / "o.pth", pkl, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(ValueError, match="reaches past its storage"):
        load_torch_file(path)


def test_negative_sizes_are_refused_naming_the_file(tmp_path):
    pkl = _state_pickle({"w": _tensor(_storage("0", "FloatStorage", 4), 0, (-1,), (1,))})
    path = _write_zip(tmp_path / "neg.pth", pkl, {"0": np.zeros(4, "<f4").tobytes()})
    with pytest.raises(ValueError, match="neg.pth.*size must be a tuple of at most 32 non-neg"):
        load_torch_file(path)


def test_storage_bytes_must_match_the_declared_size(tmp_path):
    pkl = _state_pickle({"w": _tensor(_storage("0", "FloatStorage", 4), 0, (2,), (1,))})
    path = _write_zip(tmp_path / "s.pth", pkl, {"0": b"\0" * 12})
    with pytest.raises(ValueError, match="holds 12 bytes"):
        load_torch_file(path)


def test_truncated_zip_and_legacy_files_name_the_file(tmp_path):
    pkl = _state_pickle(_strided_entries())
    whole = tmp_path / "whole.pth"
    _write_zip(whole, pkl, {"0": STORAGE12.tobytes()})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.pth.*truncated"):
        load_torch_file(cut)

    legacy = _legacy_bytes(_state_pickle(_strided_entries(True)), [("0", 12, STORAGE12.tobytes())])
    for n, what in ((len(legacy) - 5, "truncated: storage '0' has 43 of 48 bytes"), (90, "")):
        short = tmp_path / f"short{n}.pth"
        short.write_bytes(legacy[:n])
        with pytest.raises(ValueError, match=f"short{n}.pth") as err:
            load_torch_file(short)
        assert what in str(err.value)


def test_zip_without_data_pkl_or_storage_record(tmp_path):
    npz = tmp_path / "weights.npz"
    np.savez(npz, a=np.zeros(2))
    with pytest.raises(ValueError, match="weights.npz.*data.pkl"):
        load_torch_file(npz)
    pkl = _state_pickle({"w": _tensor(_storage("7", "FloatStorage", 1), 0, (1,), (1,))})
    path = _write_zip(tmp_path / "nodata.pth", pkl, {})
    with pytest.raises(ValueError, match="'archive/data/7' is missing"):
        load_torch_file(path)


def test_non_pickle_and_missing_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("just some text, not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.pth.*neither a zip-format nor a legacy"):
        load_torch_file(text)
    head = tmp_path / "zip_head.pth"  # a zip's first bytes ('P' is also a pickle opcode)
    head.write_bytes(b"PK\x03\x04\n\x00\x00\x00data\n")
    with pytest.raises(ValueError, match="zip_head.pth.*neither a zip-format nor a legacy"):
        load_torch_file(head)
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="plain.pth.*a pickle, but not a torch.save file"):
        load_torch_file(plain)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torch_file(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="directory"):
        load_torch_file(tmp_path)


def test_unwrap_accepts_a_state_dict_or_a_checkpoint_wrapping_one():
    sd = {"a": np.zeros(2), "b": np.ones(3)}
    assert unwrap_state_dict(sd, "x") == sd
    assert unwrap_state_dict({"model": sd, "epoch": 3}, "x") == sd
    assert unwrap_state_dict({"state_dict": sd, "optimizer": {"lr": 0.1}}, "x") == sd
    with pytest.raises(ValueError, match=r"\['epoch', 'net'\]"):
        unwrap_state_dict({"net": sd, "epoch": 3}, "x")
    with pytest.raises(ValueError, match="holds a list"):
        unwrap_state_dict([sd], "x")


# -- against torch's own writer ------------------------------------------------------------


def _torch_cases(torch):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    g = torch.Generator().manual_seed(0)
    cases = {
        "float32": torch.randn(3, 4, generator=g),
        "transpose": base.t(),  # non-contiguous view
        "slice": base[1:, 2:5],  # offset view, shares base's storage
        "base": base,
        "float64_column": torch.randn(3, 3, dtype=torch.float64, generator=g)[:, 1],
        "float16": torch.randn(2, 3, generator=g).half(),
        "bfloat16_t": torch.randn(5, 3, generator=g).to(torch.bfloat16).t(),
        "int64_scalar": torch.tensor(-7, dtype=torch.int64),
        "int32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "int16": torch.tensor([-3, 300], dtype=torch.int16),
        "int8": torch.tensor([-128, 5], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.randn(3, dtype=torch.complex64, generator=g),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
    }
    cases["uint16"] = torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16)
    return cases


def _torch_reference(torch, t):
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_equals_torch_for_every_dtype_and_view(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    cases = _torch_cases(torch)
    assert cases["slice"].untyped_storage().data_ptr() == cases["base"].untyped_storage().data_ptr()
    path = tmp_path / "cases.pth"
    torch.save(cases, path, _use_new_zipfile_serialization=zip_format)
    is_zip = zipfile.is_zipfile(path)
    assert is_zip == zip_format
    ours = read_state_dict(path)
    assert list(ours) == list(cases)
    for name, t in cases.items():
        want = _torch_reference(torch, t)
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.c_contiguous, name


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_module_state_dict_and_wrapped_checkpoint(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net[1].running_mean.uniform_()
    sd = net.state_dict()  # an OrderedDict carrying _metadata (pickled with BUILD)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "ckpt.pth"
    torch.save(
        {"model": sd, "optimizer": opt.state_dict(), "epoch": 3},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    ours = read_state_dict(path)
    assert list(ours) == list(sd)
    for k, t in sd.items():
        np.testing.assert_array_equal(ours[k], t.numpy(), err_msg=k)
    assert int(ours["1.num_batches_tracked"]) == 0 and ours["1.num_batches_tracked"].shape == ()


def test_a_pickled_module_is_refused_naming_its_class(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear.*plain state dict"):
        load_torch_file(path)
