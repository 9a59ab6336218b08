"""The toolkit demo really learns, and the CLI wires it up."""

import numpy as np
import pytest

from mrcnn_edu import cli, toolkit_demo, weights
from mrcnn_edu.data.shapes import SHAPE_KINDS, shape_mask, toy_classification


def test_shape_masks_have_the_analytic_areas():
    r = 20.0
    circle = shape_mask("circle", 100, 100, 50, 50, r)
    square = shape_mask("square", 100, 100, 50, 50, r)
    triangle = shape_mask("triangle", 100, 100, 50, 50, r)
    assert abs(circle.sum() - np.pi * r * r) / (np.pi * r * r) < 0.01
    assert square.sum() == 40 * 40
    assert abs(triangle.sum() - 2 * r * r) / (2 * r * r) < 0.03
    # the triangle points up: its top row is narrower than its bottom row
    rows = np.flatnonzero(triangle.any(axis=1))
    assert triangle[rows[0]].sum() < triangle[rows[-1]].sum()


def test_shape_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown shape kind"):
        shape_mask("hexagon", 10, 10, 5, 5, 2)
    with pytest.raises(ValueError, match="radius"):
        shape_mask("circle", 10, 10, 5, 5, 0)


def test_toy_classification_is_seeded_and_labelled():
    a, la = toy_classification(8, rng=np.random.default_rng(1))
    b, lb = toy_classification(8, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (8, 1, 20, 20) and a.dtype == np.float32
    assert set(la) <= set(range(len(SHAPE_KINDS)))


def test_toolkit_demo_loss_falls_and_generalises(tmp_path):
    result = toolkit_demo.run(out_dir=str(tmp_path), steps=200, progress=False)
    losses = result["losses"]
    assert np.mean(losses[-25:]) < 0.5 * np.mean(losses[:25])
    assert result["accuracy"] > 0.8
    state = weights.load(result["weights"])
    assert "7.weight" in state and state["7.weight"].shape == (3, 16 * 5 * 5)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_cli_demo_toolkit(tmp_path, capsys):
    assert (
        cli.main(["demo", "--toolkit", "--steps", "60", "--no-progress", "--out", str(tmp_path)])
        == 0
    )
    assert "held-out accuracy" in capsys.readouterr().out


def test_cli_rejects_bad_steps():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
