"""Anchors: cell anchors by the formula, rounding, grid order, strides."""

import numpy as np
import pytest

from mrcnn_edu.anchors import AnchorGenerator


def test_cell_anchors_for_size_32_hand_computed():
    gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),))
    (cells,) = gen.cell_anchors()
    # ratio 0.5: w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63; halves round to 23 and 11
    np.testing.assert_array_equal(
        cells, [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    )
    assert cells.dtype == np.float32


def test_cell_anchors_keep_area_and_ratio_up_to_rounding():
    gen = AnchorGenerator()
    for (size,), cells in zip(gen.sizes, gen.cell_anchors()):
        w = cells[:, 2] - cells[:, 0]
        h = cells[:, 3] - cells[:, 1]
        np.testing.assert_allclose(w * h, size**2, rtol=0.1)
        np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=0.1)


def test_cell_anchors_round_half_to_even():
    # size 5, ratio 1: corners at +-2.5 -> 2 (half-to-even), not 3 (half away from zero)
    # size 7: +-3.5 -> 4
    gen = AnchorGenerator(sizes=((5, 7),), aspect_ratios=((1.0,),))
    np.testing.assert_array_equal(gen.cell_anchors()[0], [[-2, -2, 2, 2], [-4, -4, 4, 4]])


def test_cell_anchors_are_ratio_major_then_size():
    gen = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((1.0, 4.0),))
    widths = [c[2] - c[0] for c in gen.cell_anchors()[0]]
    np.testing.assert_array_equal(widths, [16, 32, 8, 16])  # (r=1,s=16) (r=1,s=32) (r=4,...)


def test_grid_anchors_location_major_row_by_row():
    gen = AnchorGenerator(sizes=((8,),), aspect_ratios=((0.5, 1.0, 2.0),))
    (cells,) = gen.cell_anchors()
    (anchors,) = gen.grid_anchors([(2, 3)], [(4, 8)])  # H=2, W=3, stride_y=4, stride_x=8
    assert anchors.shape == (2 * 3 * 3, 4)
    for y in range(2):
        for x in range(3):
            for a in range(3):
                row = (y * 3 + x) * 3 + a
                np.testing.assert_array_equal(anchors[row], cells[a] + [8 * x, 4 * y, 8 * x, 4 * y])


def test_forward_strides_are_image_size_floor_divided_by_feature_size():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)))
    assert gen.strides((100, 64), [(25, 16), (12, 8)]) == [(4, 4), (8, 8)]
    anchors = gen((100, 64), [(25, 16), (12, 8)])
    assert anchors.shape == (25 * 16 + 12 * 8, 4)
    assert gen.num_anchors_per_level([(25, 16), (12, 8)]) == [400, 96]
    # the last anchor of level 2 sits at x = 7 * 8, y = 11 * 8
    np.testing.assert_array_equal(anchors[-1], [56 - 32, 88 - 32, 56 + 32, 88 + 32])


def test_single_level_faster_rcnn_use():
    gen = AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == [9]
    anchors = gen((600, 1000), [(37, 62)])
    assert anchors.shape == (37 * 62 * 9, 4)
    assert gen.strides((600, 1000), [(37, 62)]) == [(16, 16)]


def test_default_generator_has_five_levels_three_anchors_each():
    gen = AnchorGenerator()
    assert gen.num_anchors_per_location() == [3] * 5
    assert [int(c[1, 2] - c[1, 0]) for c in gen.cell_anchors()] == [32, 64, 128, 256, 512]


def test_anchors_are_cached_and_read_only():
    gen = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))
    a = gen((16, 16), [(4, 4)])
    assert gen((16, 16), [(4, 4)]) is a
    assert not a.flags.writeable
    assert gen((16, 16), [(4, 4)], dtype=np.float64).dtype == np.float64


def test_level_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator()((64, 64), [(16, 16)])
    with pytest.raises(ValueError, match="does not fit"):
        AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),))((8, 8), [(16, 16)])
