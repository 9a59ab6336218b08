"""The model's input transform: torchvision's resize rule, bilinear images, nearest masks, boxes
scaled with their image, scale jitter drawn from the model's generator, and predictions mapped
back to the images as given.

Hand-computed cases define each piece; ``test_matches_torchvision_*`` (skipped without torch)
checks the whole transform against torchvision's ``GeneralizedRCNNTransform``, bit for bit.
"""

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest

from mrcnn_edu.config_checks import ConfigError
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.resample import _fma, interpolation_matrix, linear_taps, resize_image
from mrcnn_edu.run_config import RunConfig
from mrcnn_edu.transform import (
    check_size_settings,
    nearest_indices,
    prepare_inputs,
    resize_boxes,
    resize_masks,
    resized_size,
    to_original_size,
)

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def sized(min_size, max_size, num_classes=2):
    return MaskRCNNConfig(num_classes=num_classes, min_size=min_size, max_size=max_size)


def one_target(h, w, box=(2.0, 3.0, 10.0, 7.0)):
    x1, y1, x2, y2 = (int(v) for v in box)
    mask = np.zeros((1, h, w), np.uint8)
    mask[0, y1:y2, x1:x2] = 1
    return {"boxes": np.array([box], np.float32), "labels": np.array([1]), "masks": mask}


# -- the size rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, min_size, max_size, expected",
    [
        ((2000, 3000), 800, 1333, (800, 1200)),  # short side rules: scale 0.4
        ((480, 640), 800, 1333, (800, 1066)),  # 640 * 800/480 = 1066.67 -> floor
        ((100, 1000), 800, 1333, (133, 1333)),  # long side rules: scale 1.333
        ((64, 64), 128, 128, (128, 128)),  # upsampling by 2
        ((128, 128), 128, 1333, (128, 128)),  # already the size: scale 1
    ],
)
def test_resized_size_is_the_shorter_side_to_min_unless_the_longer_passes_max(
    size, min_size, max_size, expected
):
    assert resized_size(size, min_size, max_size) == expected
    # and the definition: floor(side * min(min/short, max/long)) in float64
    scale = min(min_size / min(size), max_size / max(size))
    assert expected == tuple(math.floor(s * scale) for s in size)


@pytest.mark.parametrize(
    "min_size, max_size, key, message",
    [
        (800, None, "max_size", "must be set too"),
        (None, 1333, "min_size", "must be set too"),
        (0, 1333, "min_size", "positive"),
        ([], 1333, "min_size", "positive"),
        ((800, 1400), 1333, "min_size", "must not exceed max_size"),
        (800, 0, "max_size", "positive"),
    ],
)
def test_size_settings_are_checked(min_size, max_size, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_size_settings(min_size, max_size)
    assert err.value.key == key
    with pytest.raises(ValueError, match=message):
        MaskRCNNConfig(min_size=min_size, max_size=max_size)


def test_size_settings_in_a_run_config_are_typed_and_round_trip():
    cfg = RunConfig.from_dict({"model": {"min_size": [640, 800], "max_size": 1333}})
    assert cfg.model.min_size == (640, 800) and cfg.model.max_size == 1333
    assert RunConfig.from_dict(cfg.to_dict()).model == cfg.model
    assert MaskRCNNConfig(min_size=800, max_size=1333).min_size == (800,)
    assert MaskRCNNConfig.small(3).min_size is None  # the shapes preset keeps native size
    for bad in ("800", 800.0, True):
        with pytest.raises(ValueError, match="model.min_size"):
            RunConfig.from_dict({"model": {"min_size": bad, "max_size": 1333}})


# -- bilinear: hand-computed ----------------------------------------------------------------------


def test_linear_taps_upsampling_by_two():
    # ratio 0.5: sources 0.5 * (i + 0.5) - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25
    i0, i1, w0, w1 = linear_taps(2, 4)
    assert i0.tolist() == [0, 0, 0, 1] and i1.tolist() == [1, 1, 1, 1]  # last pixel: both taps
    np.testing.assert_array_equal(w1, np.float32([0, 0.25, 0.75, 0.25]))
    np.testing.assert_array_equal(w0, 1 - w1)


def test_resize_by_hand_up_and_down():
    up = resize_image(np.float32([[[0, 4]]]), (1, 4))
    np.testing.assert_array_equal(up, np.float32([[[0, 1, 3, 4]]]))
    # 4 -> 2: sources 2 * (i + 0.5) - 0.5 = 0.5, 2.5: the mean of each pair
    down = resize_image(np.float32([[[0, 2, 10, 20]]]), (1, 2))
    np.testing.assert_array_equal(down, np.float32([[[1, 15]]]))
    # 2 x 2 -> 4 x 4: rows [0, 1, 3, 4] and [8, 9, 11, 12], then the same weights down columns
    img = np.float32([[[0, 4], [8, 12]]])
    expected = np.float32([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]])
    np.testing.assert_array_equal(resize_image(img, (4, 4))[0], expected)
    # a constant image stays constant; the size is (h, w) and channels are kept apart
    img = np.stack([np.full((5, 7), v, np.float32) for v in (0.25, 0.5, 0.75)])
    out = resize_image(img, (3, 11))
    assert out.shape == (3, 3, 11) and out.dtype == np.float32
    for c, v in enumerate((0.25, 0.5, 0.75)):
        assert np.all(out[c] == np.float32(v))


def test_resize_is_the_separable_matrix_product():
    rng = np.random.default_rng(0)
    img = rng.random((2, 9, 13))
    for size in [(4, 20), (17, 6), (9, 13)]:
        wy, wx = (
            interpolation_matrix(9, size[0], np.float64),
            interpolation_matrix(13, size[1], np.float64),
        )
        np.testing.assert_allclose(wy.sum(1), 1.0, rtol=0, atol=1e-15)
        expected = np.einsum("ij,cjk,lk->cil", wy, img, wx)
        np.testing.assert_allclose(resize_image(img, size), expected, rtol=0, atol=1e-14)


def test_fma_rounds_once():
    # a * b = 1 + 2^-11 + 2^-24 exactly; rounded first (a tie, to even) it cancels to 0
    a = np.float32([1 + 2**-12])
    c = np.float32([-(1 + 2**-11)])
    assert (a * a + c)[0] == 0
    assert _fma(a, a, c)[0] == np.float32(2**-24)
    # an exact sum just above a float32 midpoint: float64 rounding lands on the midpoint and a
    # second rounding would go to even (1.0); one rounding goes up
    a = np.float32([-(1 + 2**-23)])
    b = np.float32([2**-24 * (1 - 2**-23)])
    c = np.float32([1 + 2**-23])
    assert np.float32(np.float64(a[0]) * np.float64(b[0]) + np.float64(c[0])) == 1.0
    assert _fma(a, b, c)[0] == np.float32(1 + 2**-23)


# -- masks and boxes ------------------------------------------------------------------------------


def test_nearest_indices_by_hand():
    assert nearest_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # doubling repeats each pixel
    assert nearest_indices(3, 2).tolist() == [0, 1]  # floor(i * 1.5)
    assert nearest_indices(5, 3).tolist() == [0, 1, 3]  # floor(i * 5/3)
    assert nearest_indices(4, 4).tolist() == [0, 1, 2, 3]


def test_resize_masks_nearest_keeps_dtype_and_values():
    masks = np.array([[[1, 0, 1], [0, 1, 0]]], np.uint8)
    out = resize_masks(masks, (4, 6))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 6)
    np.testing.assert_array_equal(out[0], np.repeat(np.repeat(masks[0], 2, 0), 2, 1))
    np.testing.assert_array_equal(resize_masks(masks, (1, 2))[0], [[1, 0]])


def test_resize_boxes_scales_each_axis_by_out_over_in():
    boxes = np.array([[10, 20, 30, 40]], np.float32)
    out = resize_boxes(boxes, (100, 200), (50, 400))  # y halves, x doubles
    np.testing.assert_array_equal(out, np.float32([[20, 10, 60, 20]]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(resize_boxes(out, (50, 400), (100, 200)), boxes)


# -- the whole transform --------------------------------------------------------------------------


def test_native_size_is_normalise_and_pad_only():
    rng = np.random.default_rng(1)
    image = rng.random((3, 50, 70)).astype(np.float32)
    batch, sizes, original, targets = prepare_inputs([image], sized(None, None), np.float32)
    assert sizes == original == [(50, 70)] and targets is None and batch.shape == (1, 3, 64, 96)
    np.testing.assert_array_equal(batch[0, :, :50, :70], (image - MEAN) / STD)
    assert not batch[0, :, 50:].any() and not batch[0, :, :, 70:].any()


def test_targets_are_checked_at_the_original_size_and_resized_with_the_image():
    image = np.zeros((3, 20, 30), np.float32)
    target = one_target(20, 30)
    inputs = prepare_inputs([image], sized(40, 100), np.float32, [target])
    assert inputs.image_sizes == [(40, 60)] and inputs.original_sizes == [(20, 30)]
    t = inputs.targets[0]
    np.testing.assert_array_equal(t["boxes"], np.float32([[4, 6, 20, 14]]))
    assert t["masks"].shape == (1, 40, 60)
    ys, xs = np.nonzero(t["masks"][0])  # the doubled mask's tight box is the doubled box
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (4, 6, 20, 14)
    with pytest.raises(ValueError, match=r"masks'\] must have shape \(1, 20, 30\)"):
        prepare_inputs([image], sized(40, 100), np.float32, [one_target(40, 60)])


def test_a_large_photo_is_resized_before_anything_else(tmp_path):
    """2000 x 3000 at 800/1333 becomes 800 x 1200: the model never sees the full photo."""
    image = np.full((3, 2000, 3000), 0.5, np.float32)
    target = one_target(2000, 3000, box=(100.0, 200.0, 600.0, 900.0))
    tracemalloc.start()
    try:
        inputs = prepare_inputs([image], sized(800, 1333), np.float32, [target])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inputs.image_sizes == [(800, 1200)] and inputs.batch.shape == (1, 3, 800, 1216)
    np.testing.assert_allclose(inputs.targets[0]["boxes"], [[40, 80, 240, 360]], rtol=1e-6)
    assert inputs.targets[0]["masks"].shape == (1, 800, 1200)
    # the input (72 MB) and its normalised copy, plus one resized plane's float64 scratch
    assert peak < 4 * image.nbytes, f"peak {peak / 1e6:.0f} MB"


def test_scale_jitter_draws_one_size_per_training_image_from_the_rng():
    cfg = sized((20, 40), 100)
    images = [np.zeros((3, 10, 10), np.float32)] * 6
    rng = np.random.default_rng(3)
    expected = [((20, 40)[i],) * 2 for i in np.random.default_rng(3).integers(2, size=6)]
    sizes = prepare_inputs(images, cfg, np.float32, training=True, rng=rng).image_sizes
    assert sizes == expected and len(set(sizes)) == 2
    # inference uses the last size and draws nothing; one size draws nothing in training
    state = rng.bit_generator.state
    assert prepare_inputs(images, cfg, np.float32, rng=rng).image_sizes == [(40, 40)] * 6
    assert (
        prepare_inputs(images, sized(20, 100), np.float32, training=True, rng=rng).image_sizes
        == [(20, 20)] * 6
    )
    assert rng.bit_generator.state == state


def small_sized(min_size, max_size):
    return dataclasses.replace(MaskRCNNConfig.small(2), min_size=min_size, max_size=max_size)


def test_training_forward_draws_the_scale_from_model_rng():
    model = MaskRCNN(small_sized((32, 64), 64), rng=0)
    model.rng = np.random.default_rng(5)
    seen = []
    original = model.backbone.forward
    model.backbone.forward = lambda batch: seen.append(tuple(batch.shape[-2:])) or original(batch)
    for _ in range(4):
        model.forward([np.zeros((3, 16, 16), np.float32)], [one_target(16, 16)])
    # a forward's first draw is the size; the samplers then draw from the same stream
    first = (32, 64)[int(np.random.default_rng(5).integers(2))]
    assert seen[0] == (first, first)
    assert set(seen) == {(32, 32), (64, 64)}


# -- predictions back to the original image -------------------------------------------------------


def test_to_original_size_scales_boxes_back_and_pastes_masks_at_the_original_resolution():
    det = {
        "boxes": np.array([[8, 4, 24, 12]], np.float32),  # in a 16 x 32 resized image
        "labels": np.array([1]),
        "scores": np.array([0.9], np.float32),
        "mask_probs": np.ones((1, 28, 28), np.float32),
    }
    (out,) = to_original_size([det], [(16, 32)], [(8, 16)])
    np.testing.assert_array_equal(out["boxes"], np.float32([[4, 2, 12, 6]]))
    assert out["masks"].shape == (1, 8, 16)
    ys, xs = np.nonzero(out["masks"][0])
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (4, 2, 12, 6)


def test_predict_maps_boxes_back_to_each_image_as_given():
    """A model whose RoI heads always detect the middle half of the image they are given: at
    native size and at twice the size, predict reports the same box of the original image."""

    def middle_half(features, proposals, image_sizes, targets=None):
        dets = []
        for h, w in image_sizes:
            box = np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], np.float32)
            dets.append({"boxes": box, "labels": np.array([1]), "scores": np.float32([0.9]),
                         "mask_probs": np.ones((1, 28, 28), np.float32)})  # fmt: skip
        return dets, {}

    image = np.random.default_rng(0).random((3, 48, 64)).astype(np.float32)
    results = []
    for min_size, max_size in ((None, None), (96, 128)):
        model = MaskRCNN(small_sized(min_size, max_size), rng=0)
        model.roi_heads = middle_half
        results.append(model.predict([image])[0])
    for r in results:
        np.testing.assert_array_equal(r["boxes"], np.float32([[16, 12, 48, 36]]))
        assert r["masks"].shape == (1, 48, 64)
    np.testing.assert_array_equal(results[0]["masks"], results[1]["masks"])


# -- torchvision ----------------------------------------------------------------------------------


@pytest.fixture
def torch_generic_kernel():
    """torch has two CPU bilinear kernels that round differently: the generic one and a
    channels-last one, used for 3-channel images when torch runs on one thread, or when the
    output's height + width <= 128. Two threads and outputs above 128 select the generic one,
    which ``resize_image`` reproduces (docs/conventions.md, section 14)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "sizes, min_size, max_size",
    [
        ([(37, 53), (61, 45)], 200, 333),  # two images of one batch, upsampled
        ([(300, 200)], 150, 1000),  # downsampled
        ([(90, 700)], 160, 400),  # the long side rules
    ],
)
def test_matches_torchvision_generalized_rcnn_transform(
    torch_generic_kernel, sizes, min_size, max_size
):
    torch = torch_generic_kernel
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    rng = np.random.default_rng(7)
    images = [rng.random((3, h, w)).astype(np.float32) for h, w in sizes]
    targets = []
    for h, w in sizes:
        masks = (rng.random((2, h, w)) > 0.5).astype(np.uint8)
        boxes = np.array([[1.5, 2.25, w - 3.1, h - 0.7], [0, 0, w, h]], np.float32)
        targets.append({"boxes": boxes, "labels": np.array([1, 2]), "masks": masks})
    tv = GeneralizedRCNNTransform(min_size, max_size, MEAN.ravel().tolist(), STD.ravel().tolist())
    tv.eval()
    tv_targets = [{k: torch.from_numpy(v) for k, v in t.items()} for t in targets]
    tv_images, tv_targets = tv([torch.from_numpy(im) for im in images], tv_targets)
    ours = prepare_inputs(images, sized(min_size, max_size), np.float32, targets)
    assert ours.image_sizes == [tuple(s) for s in tv_images.image_sizes]
    np.testing.assert_array_equal(ours.batch, tv_images.tensors.numpy())
    for t, ref in zip(ours.targets, tv_targets):
        np.testing.assert_array_equal(t["boxes"], ref["boxes"].numpy())
        np.testing.assert_array_equal(t["masks"], ref["masks"].numpy())


def test_boxes_back_to_the_original_like_torchvision_postprocess(torch_generic_kernel):
    from torchvision.models.detection.transform import resize_boxes as tv_resize_boxes

    torch = torch_generic_kernel
    boxes = np.random.default_rng(2).uniform(0, 500, (20, 4)).astype(np.float32)
    for resized, original in [((800, 1066), (480, 640)), ((133, 1333), (100, 1000))]:
        expected = tv_resize_boxes(torch.from_numpy(boxes), list(resized), list(original))
        np.testing.assert_array_equal(resize_boxes(boxes, resized, original), expected.numpy())
