"""The CuPy and Numba-CUDA kernels equal the NumPy reference on a real GPU.

Tests marked ``gpu`` skip cleanly without a CUDA device (tests/conftest.py). Each runs both
implementations, called directly and through the public ops' dispatch
(``MRCNN_EDU_KERNELS=cupy|numba``), on random and edge cases: empty (zero-size) RoIs, K = 0,
RoIs outside the map, adaptive sampling (-1), aligned True/False, float32 and float64, NMS ties,
IoU exactly at the threshold, 20k boxes.

Two tests need no GPU: the CUDA C sources compile with NVRTC, and the Numba kernels compile to
PTX for the real CUDA target (the simulator runs them as Python and would not notice a typing
error). They skip when the CUDA compilers are not installed.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from helpers import random_boxes

IMPLEMENTATIONS = ("cupy", "numba")
DTYPES = ((np.float32, 2e-5), (np.float64, 1e-12))  # dtype, tolerance vs NumPy


def _kernel_module(impl: str, family: str):
    if impl == "numba":
        from numba.core import config

        if config.ENABLE_CUDASIM:
            pytest.skip("the Numba GPU tests need the real CUDA target, not the simulator")
    return importlib.import_module(f"mrcnn_edu.kernels.{impl}_{family}")


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def _roi_inputs(dtype, n=2, c=4, h=13, w=17, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, c, h, w)).astype(dtype)
    rois = np.array(
        [
            [0, 3.3, 2.2, 40.7, 30.1],  # ordinary (scale 0.5)
            [1, -10.0, -8.0, 12.0, 14.0],  # partly outside, top-left
            [1, 25.0, 20.0, 60.0, 45.0],  # partly outside, bottom-right
            [0, 80.0, 80.0, 99.0, 90.0],  # entirely outside the map
            [1, 9.0, 9.0, 9.0, 9.0],  # zero size
            [1, 0.0, 0.0, 2.0 * w, 2.0 * h],  # the whole map
        ]
    )
    k = 40
    xy = rng.uniform(-5, 2 * w, (k, 2))
    wh = rng.uniform(0, 2 * h, (k, 2))
    random_rois = np.concatenate([rng.integers(0, n, (k, 1)), xy, xy + wh], axis=1)
    return features, np.concatenate([rois, random_rois]).astype(dtype), rng


# -- RoIAlign ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_forward_and_backward_match_numpy(cp, impl, dtype, tol, aligned, sampling_ratio):
    from mrcnn_edu.roi_ops import roi_align, roi_align_backward

    kernels = _kernel_module(impl, "roi_align")
    features, rois, rng = _roi_inputs(dtype)
    args = ((5, 4), 0.5, sampling_ratio, aligned)
    want = roi_align(features, rois, *args)
    got = kernels.roi_align(cp.asarray(features), cp.asarray(rois), *args)
    assert isinstance(got, cp.ndarray) and got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got.get(), want, rtol=tol, atol=tol)

    grad = rng.standard_normal(want.shape).astype(dtype)
    want_grad = roi_align_backward(grad, rois, features.shape, *args)
    got_grad = kernels.roi_align_backward(cp.asarray(grad), cp.asarray(rois), features.shape, *args)
    assert got_grad.dtype == dtype and got_grad.shape == features.shape
    # atomics add in a nondeterministic order: equal up to float rounding
    np.testing.assert_allclose(got_grad.get(), want_grad, rtol=tol * 10, atol=tol * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_public_roi_align_dispatches_to_the_chosen_kernel(cp, impl, monkeypatch):
    from mrcnn_edu.roi_ops import roi_align, roi_align_backward

    _kernel_module(impl, "roi_align")
    monkeypatch.setenv("MRCNN_EDU_KERNELS", impl)
    features, rois, rng = _roi_inputs(np.float32, seed=3)
    out = roi_align(cp.asarray(features), cp.asarray(rois), 7, 0.5, 2, False)
    assert isinstance(out, cp.ndarray)
    np.testing.assert_allclose(
        out.get(), roi_align(features, rois, 7, 0.5, 2, False), rtol=2e-5, atol=2e-5
    )
    grad = rng.standard_normal(out.shape).astype(np.float32)
    g = roi_align_backward(cp.asarray(grad), cp.asarray(rois), features.shape, 7, 0.5, 2, False)
    np.testing.assert_allclose(
        g.get(),
        roi_align_backward(grad, rois, features.shape, 7, 0.5, 2, False),
        rtol=2e-4,
        atol=2e-4,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_roi_align_with_no_rois(cp, impl):
    kernels = _kernel_module(impl, "roi_align")
    features = cp.ones((2, 3, 5, 5), cp.float32)
    rois = cp.zeros((0, 5), cp.float32)
    out = kernels.roi_align(features, rois, 7, 1.0, -1, True)
    assert out.shape == (0, 3, 7, 7) and out.dtype == cp.float32
    grad = kernels.roi_align_backward(out, rois, features.shape, 7, 1.0, -1, True)
    assert grad.shape == features.shape and not bool(grad.any())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_roi_align_backward_accumulates_overlapping_rois(cp, impl):
    """Many identical RoIs hit the same pixels at once: the atomics must not lose an update."""
    from mrcnn_edu.roi_ops import roi_align_backward

    kernels = _kernel_module(impl, "roi_align")
    rois = np.tile(np.array([[0, 1.0, 1.0, 6.0, 6.0]]), (500, 1))
    grad = np.ones((500, 2, 3, 3))
    want = roi_align_backward(grad, rois, (1, 2, 8, 8), 3, 1.0, 2, True)
    got = kernels.roi_align_backward(
        cp.asarray(grad), cp.asarray(rois), (1, 2, 8, 8), 3, 1.0, 2, True
    )
    np.testing.assert_allclose(got.get(), want, rtol=1e-12, atol=1e-12)
    # every sample's four bilinear weights sum to 1, and each bin's samples average to its value
    np.testing.assert_allclose(float(got.sum()), 500 * 2 * 9, rtol=1e-12)


# -- RoIPool -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float32", "float64"])
def test_roi_pool_matches_numpy(cp, impl, dtype, tol):
    from mrcnn_edu.roi_ops import roi_pool, roi_pool_backward

    kernels = _kernel_module(impl, "roi_align")
    if not hasattr(kernels, "roi_pool"):
        pytest.skip(f"no RoIPool kernel in the {impl} module")
    features, rois, rng = _roi_inputs(dtype, seed=5)
    want, want_argmax = roi_pool(features, rois, (4, 3), 0.5)
    got, got_argmax = kernels.roi_pool(cp.asarray(features), cp.asarray(rois), (4, 3), 0.5)
    np.testing.assert_array_equal(got.get(), want)
    np.testing.assert_array_equal(got_argmax.get(), want_argmax)

    if hasattr(kernels, "roi_pool_backward"):
        grad = rng.standard_normal(want.shape).astype(dtype)
        want_grad = roi_pool_backward(grad, want_argmax, features.shape, rois)
        got_grad = kernels.roi_pool_backward(
            cp.asarray(grad), got_argmax, features.shape, cp.asarray(rois)
        )
        np.testing.assert_allclose(got_grad.get(), want_grad, rtol=tol, atol=tol)


# -- NMS -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 64, 65, 1000, 20000])
def test_nms_equals_numpy(cp, impl, dtype, n):
    from mrcnn_edu.nms import nms

    kernels = _kernel_module(impl, "nms")
    rng = np.random.default_rng(n)
    size = 200.0 if n < 5000 else 2000.0
    boxes = random_boxes(rng, n, dtype, size=size, wh=(1.0, size / 3))
    scores = rng.integers(0, 50, n).astype(dtype)  # many tied scores
    for threshold in (0.5, 0.7):
        want = nms(boxes, scores, threshold)
        got = kernels.nms(cp.asarray(boxes), cp.asarray(scores), threshold)
        assert got.dtype == cp.int64
        np.testing.assert_array_equal(got.get(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nms_threshold_edge_cases(cp, impl, dtype):
    kernels = _kernel_module(impl, "nms")
    # IoU exactly 0.5 (inter 2, union 4) survives a 0.5 threshold
    boxes = cp.asarray(np.array([[0, 0, 4, 1], [0, 0, 2, 1]], dtype=dtype))
    scores = cp.asarray(np.array([0.9, 0.8], dtype=dtype))
    assert kernels.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert kernels.nms(boxes, scores, 0.4999).tolist() == [0]
    # the IoU float32(0.1) is above the double 0.1; the float64 IoU 0.1 is not
    boxes = cp.asarray(np.array([[0, 0, 10, 1], [0, 0, 1, 1]], dtype=dtype))
    expected = [0] if dtype == np.float32 else [0, 1]
    assert kernels.nms(boxes, scores, 0.1).tolist() == expected
    # equal scores: lower index first
    boxes = cp.asarray(np.array([[0, 0, 10, 10]] * 3, dtype=dtype))
    scores = cp.asarray(np.array([0.5, 0.9, 0.9], dtype=dtype))
    assert kernels.nms(boxes, scores, 0.5).tolist() == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_batched_nms_and_dispatch_equal_numpy(cp, impl, monkeypatch):
    from mrcnn_edu.nms import batched_nms, nms

    kernels = _kernel_module(impl, "nms")
    monkeypatch.setenv("MRCNN_EDU_KERNELS", impl)
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, 3000, np.float32, size=200.0, wh=(1.0, 200.0 / 3))
    scores = rng.random(3000).astype(np.float32)
    idxs = rng.integers(0, 5, 3000)
    want = batched_nms(boxes, scores, idxs, 0.5)
    got = kernels.batched_nms(cp.asarray(boxes), cp.asarray(scores), cp.asarray(idxs), 0.5)
    np.testing.assert_array_equal(got.get(), want)
    # the public ops on CuPy arrays go through the kernel chosen by MRCNN_EDU_KERNELS
    got = nms(cp.asarray(boxes), cp.asarray(scores), 0.5)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(got.get(), nms(boxes, scores, 0.5))
    got = batched_nms(cp.asarray(boxes), cp.asarray(scores), cp.asarray(idxs), 0.5)
    np.testing.assert_array_equal(got.get(), want)


# -- compile checks without a GPU ----------------------------------------------------------
def _nvrtc_compile(source: str, name_expressions: list[str], options: tuple[str, ...]) -> str:
    """Compile CUDA C with NVRTC for sm_90; returns the log, raises on failure."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"kernels.cu", 0, [], [])
    except Exception as e:  # the NVRTC library itself is missing
        pytest.skip(f"NVRTC not available: {e}")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC not available: {err}")
    for name in name_expressions:
        nvrtc.nvrtcAddNameExpression(prog, name.encode())
    opts = [b"--gpu-architecture=compute_90"] + [o.encode() for o in options]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # A writable buffer: NVRTC writes the log into it. The usual ``b" " * size`` hands it an
    # immutable bytes object, for size 1 the interpreter's shared b" " itself, and the NUL
    # written into it broke every later use of b" " in the process (torch files unpickled).
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = bytes(log).rstrip(b"\0").decode(errors="replace")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, text
    return text


@pytest.mark.parametrize("family", ["roi_align", "nms"])
def test_cupy_kernel_sources_compile_with_nvrtc(family):
    module = importlib.import_module(f"mrcnn_edu.kernels.cupy_{family}")
    names = [f"{k}<{c}>" for k in module._TEMPLATED for c in module._CTYPES.values()]
    _nvrtc_compile(module._SOURCE, names, module._OPTIONS)


def test_numba_kernels_compile_to_ptx_for_the_real_gpu():
    """Type-checks the Numba kernels for the CUDA target; also checks that float32 kernels do
    no float64 arithmetic and that NMS multiplies are not fused (fma) with later adds."""
    pytest.importorskip("numba")
    from numba.core import config

    if config.ENABLE_CUDASIM:
        pytest.skip("compile_ptx needs the real CUDA target (NUMBA_ENABLE_CUDASIM is set)")
    from mrcnn_edu.kernels import numba_nms, numba_roi_align
    from numba import cuda
    from numba import types as nt
    from numba.core.errors import NumbaError

    def ptx(kernel, *signature):
        try:
            return cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))[0]
        except NumbaError:
            raise  # a typing or lowering error in our kernel: the test must fail
        except Exception as e:
            # a missing toolchain piece: libNVVM / NVRTC (pip install 'cuda-toolkit[nvvm,nvrtc]'),
            # or numba's built-in numba.cuda, which wants a driver even to compile
            pytest.skip(f"this numba.cuda cannot compile PTX here: {type(e).__name__}: {e}")

    i64_4, u64_2 = nt.Array(nt.int64, 4, "C"), nt.Array(nt.uint64, 2, "C")
    for dtype, t in ((np.float32, nt.float32), (np.float64, nt.float64)):
        a2, a4 = nt.Array(t, 2, "C"), nt.Array(t, 4, "C")
        k = numba_roi_align._kernels(np.dtype(dtype))
        roi_ptx = [
            ptx(k.align_forward, a4, a2, a4, t, nt.int64, nt.boolean),
            ptx(k.align_backward, a4, a2, a4, t, nt.int64, nt.boolean),
            ptx(k.pool_forward, a4, a2, a4, i64_4, t),
            ptx(k.pool_backward, a4, i64_4, a2, nt.boolean, a4),
        ]
        iou_mask, reduce = numba_nms._kernels(np.dtype(dtype))
        nms_ptx = ptx(
            iou_mask, a2, nt.Array(nt.int64, 1, "C"), nt.boolean, nt.int64, nt.float64, u64_2
        )
        ptx(reduce, u64_2, nt.int64, nt.Array(nt.uint8, 1, "C"))
        assert "fma" not in nms_ptx and "mul.rn" in nms_ptx
        if dtype == np.float32:
            for text in roi_ptx:
                float64_math = [line for line in text.splitlines() if ".f64" in line]
                assert not float64_math, float64_math[:5]
