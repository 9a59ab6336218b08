"""Synthetic human pose: articulated stick figures with keypoints, masks and occlusion.

Each figure is a frontal stick person with ``K = 14`` keypoints (``KEYPOINT_NAMES``: head,
neck, shoulders, elbows, hands, hips, knees, feet) joined by the ``SKELETON`` edges. A pose is
drawn at random within plausible limits: the torso leans up to 20 degrees, the head tilts, each
arm swings from hanging to raised and bends at the elbow, each leg swings out and bends at the
knee (``_random_joints`` lists the ranges). Figures are frontal, so the figure's *left* side is
on the image's *right*, as for a person facing the camera; a horizontal flip turns them into
figures whose left and right keypoints swap (``FLIP_INDEX``, ``data/transforms.py``).

The figure is drawn from the joints: capsules (thick segments) for the limbs, shoulders, hips
and torso, a disc for the head; its mask is the union, exact at pixel centres, and its limbs are
thick enough that the pixel holding a joint is always inside the figure. Several figures per
image overlap in painter's order (later ones in front), each keeping at least ``min_visible``
of its pixels visible. Keypoint visibility follows COCO:

- ``v = 2`` visible: the joint lies in the image and no later figure covers its pixel;
- ``v = 1`` labelled but hidden: a figure in front covers its pixel (its position is still
  the true one, as COCO annotators mark occluded joints);
- ``v = 0`` not labelled: the joint lies outside the image; stored as ``(0, 0, 0)``.

Coordinates are continuous pixels like boxes (pixel ``(row r, column c)`` covers
``[c, c + 1) x [r, r + 1)``), so a joint at ``(x, y)`` sits on pixel ``(floor(y), floor(x))``.

``PoseDataset[i]`` is an item like ``ShapesDataset``'s plus ``"keypoints"`` ``(G, K, 3)``; item
``i`` is drawn from ``np.random.default_rng([seed, i])``. ``to_coco_dict``/``write_coco`` (from
``shapes.py``) export it as COCO person keypoints (the category lists the keypoint names and the
1-based skeleton, as COCO's ``person_keypoints`` files do); ``dataset.coco`` is that dict indexed
by pycocotools, the ground truth evaluation uses. ``KEYPOINT_SIGMAS`` are the per-keypoint OKS
constants for this skeleton (docs/keypoints.md explains how they relate to COCO's).
"""

from __future__ import annotations

import numpy as np

from .shapes import _background, check_index, layer_objects, masks_to_boxes, paint, to_coco_dict
from .transforms import keypoint_flip_index

KEYPOINT_NAMES = (
    "head",
    "neck",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_hand",
    "right_hand",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_foot",
    "right_foot",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
# Edges between keypoints (0-based indices into KEYPOINT_NAMES); COCO files store them 1-based.
SKELETON = (
    (0, 1),  # head - neck
    (1, 2),  # neck - shoulders
    (1, 3),
    (2, 4),  # arms
    (4, 6),
    (3, 5),
    (5, 7),
    (2, 8),  # sides of the torso
    (3, 9),
    (8, 9),  # hips
    (8, 10),  # legs
    (10, 12),
    (9, 11),
    (11, 13),
)
# Keypoint j of a mirrored figure is keypoint FLIP_INDEX[j] of the original (left <-> right).
FLIP_INDEX = tuple(keypoint_flip_index(KEYPOINT_NAMES))

# OKS sigmas. The 14 keypoints are CrowdPose's (COCO's 12 body keypoints plus head and neck),
# and so are the base sigmas: COCO's for the body keypoints (hands: the wrists', feet: the
# ankles'), 0.079 for head and neck. COCO's sigmas are relative to s = sqrt(mask area) of a
# person, whose frontal silhouette covers about PERSON_AREA = 0.18 h^2 (h: standing height); a
# stick figure covers STICK_AREA = 0.216 h^2 (the mean over random poses; tests measure it).
# Scaling by SIGMA_SCALE = sqrt(PERSON_AREA / STICK_AREA) makes a pixel error cost the same OKS,
# relative to the figure's height, as for a person of that height (docs/keypoints.md).
PERSON_AREA, STICK_AREA = 0.18, 0.216
SIGMA_SCALE = float(np.sqrt(PERSON_AREA / STICK_AREA))
_BASE_SIGMAS = (
    0.079,  # head (CrowdPose)
    0.079,  # neck (CrowdPose)
    0.079,  # shoulders
    0.079,
    0.072,  # elbows
    0.072,
    0.062,  # hands <- wrists
    0.062,
    0.107,  # hips
    0.107,
    0.087,  # knees
    0.087,
    0.089,  # feet <- ankles
    0.089,
)
KEYPOINT_SIGMAS = tuple(round(SIGMA_SCALE * s, 4) for s in _BASE_SIGMAS)

# Body proportions as fractions of the figure's height (head top to feet when standing).
_TORSO, _NECK, _SHOULDER, _HIP = 0.32, 0.11, 0.11, 0.075
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.17, 0.16, 0.24, 0.23
# Drawing: (keypoint a, keypoint b, radius / height) per capsule; -1 is the pelvis (mid-hips).
_CAPSULES = (
    (1, -1, 0.075),  # torso
    (2, 3, 0.04),  # shoulders
    (8, 9, 0.045),  # hips
    (0, 1, 0.03),  # neck
    (2, 4, 0.035),  # upper arms
    (3, 5, 0.035),
    (4, 6, 0.03),  # forearms
    (5, 7, 0.03),
    (8, 10, 0.045),  # thighs
    (9, 11, 0.045),
    (10, 12, 0.038),  # shins
    (11, 13, 0.038),
)
_HEAD_RADIUS = 0.08
# The thinnest capsule (0.03 h) must reach the centre of the pixel holding its end joint
# (at most sqrt(0.5) pixel away): h >= sqrt(0.5) / 0.03.
MIN_FIGURE_HEIGHT = 24.0


class PoseDataset:
    """Seeded synthetic person keypoints: stick figures on random backgrounds.

    ``dataset[i]`` is a dict:

    - ``"image"``: ``(3, H, W)`` float32 in [0, 1]
    - ``"boxes"``: ``(G, 4)`` float32 xyxy, the tight box of each figure's visible mask
    - ``"labels"``: ``(G,)`` int64, all 1 (``"person"``)
    - ``"masks"``: ``(G, H, W)`` uint8, the visible part of each figure
    - ``"keypoints"``: ``(G, K, 3)`` float32 rows ``(x, y, v)`` in pixels, COCO visibility
    - ``"image_id"``: int, equal to ``i``

    Args:
        num_images: dataset length.
        image_size: ``(H, W)``.
        min_figures, max_figures: figures per image, drawn uniformly (an image keeps fewer
            when no place leaves every figure ``min_visible`` visible, never fewer than
            ``min_figures``).
        seed: item ``i`` is drawn from ``np.random.default_rng([seed, i])``.
        height_range: figure height in pixels (head top to feet, standing); default 0.375 to
            0.8 of ``min(H, W)`` (48-102 at 128 x 128); at least ``MIN_FIGURE_HEIGHT``.
        min_visible: a placement is rejected when it leaves any figure with less than this
            fraction of its pixels visible.
        outside: how far a figure's joints may reach beyond the image border, as a fraction of
            the figure's extent (0: every joint inside; joints outside get ``v = 0``).
    """

    def __init__(
        self,
        num_images: int,
        image_size: tuple[int, int] = (128, 128),
        min_figures: int = 1,
        max_figures: int = 3,
        seed: int = 0,
        height_range: tuple[float, float] | None = None,
        min_visible: float = 0.5,
        outside: float = 0.1,
    ) -> None:
        if int(num_images) != num_images or num_images < 0:
            raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}")
        if len(image_size) != 2 or min(image_size) < 32:
            raise ValueError(f"image_size must be (H, W) with both >= 32, got {image_size!r}")
        if not 1 <= min_figures <= max_figures:
            raise ValueError(
                f"need 1 <= min_figures <= max_figures, got {min_figures} and {max_figures}"
            )
        height, width = int(image_size[0]), int(image_size[1])
        if height_range is None:
            height_range = (0.375 * min(height, width), 0.8 * min(height, width))
        h_min, h_max = float(height_range[0]), float(height_range[1])
        if not MIN_FIGURE_HEIGHT <= h_min <= h_max <= min(height, width):
            raise ValueError(
                f"height_range must satisfy {MIN_FIGURE_HEIGHT:g} <= min <= max <= min(H, W) = "
                f"{min(height, width)} (thinner figures would lose joints between pixel "
                f"centres), got {height_range}"
            )
        if not 0 < min_visible <= 1:
            raise ValueError(f"min_visible is a fraction in (0, 1], got {min_visible}")
        if not 0 <= outside <= 0.5:
            raise ValueError(f"outside is a fraction of the figure in [0, 0.5], got {outside}")
        self.num_images = int(num_images)
        self.image_size = (height, width)
        self.min_figures, self.max_figures = int(min_figures), int(max_figures)
        self.seed = int(seed)
        self.height_range = (h_min, h_max)
        self.min_visible = float(min_visible)
        self.outside = float(outside)
        self._coco = None

    keypoint_names = KEYPOINT_NAMES
    skeleton = SKELETON
    keypoint_flip = FLIP_INDEX
    keypoint_sigmas = KEYPOINT_SIGMAS
    class_names = ("person",)
    label_to_category_id = {1: 1}
    category_id_to_label = {1: 1}

    @property
    def categories(self) -> list[dict]:
        """The COCO person-keypoints category: names of the keypoints, 1-based skeleton."""
        return [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(KEYPOINT_NAMES),
                "skeleton": [[a + 1, b + 1] for a, b in SKELETON],
            }
        ]

    @property
    def coco(self):
        """The ground truth as a ``pycocotools.coco.COCO`` (``to_coco_dict``), built once."""
        if self._coco is None:
            from .coco import coco_from_dict

            self._coco = coco_from_dict(to_coco_dict(self))
        return self._coco

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        return self._generate(check_index(index, self.num_images))[0]

    def describe(self, index: int) -> list[dict]:
        """How item ``index`` was drawn: one dict per figure, back to front, with its
        ``joints`` ``(K, 2)`` (true positions, also those outside the image), ``height``,
        ``colour`` and ``visible_fraction``."""
        return self._generate(check_index(index, self.num_images))[1]

    def __repr__(self) -> str:
        return (
            f"PoseDataset({self.num_images} images of {self.image_size}, figures "
            f"{self.min_figures}-{self.max_figures}, {NUM_KEYPOINTS} keypoints, seed={self.seed})"
        )

    def _generate(self, index: int) -> tuple[dict, list[dict]]:
        height, width = self.image_size
        rng = np.random.default_rng([self.seed, index])
        image, background_colour = _background(rng, height, width, ("flat", "gradient", "smooth"))
        wanted = int(rng.integers(self.min_figures, self.max_figures + 1))
        failure = (
            f"could not place {self.min_figures} figures in image {index} with "
            f"{self.min_visible:.0%} of each visible; lower min_figures or height_range"
        )
        full, visible, colours, placed = layer_objects(
            rng, wanted, self._place, self.min_figures, background_colour, failure
        )
        image = paint(image, full, colours, rng)
        joints = [figure_joints for figure_joints, _ in placed]
        masks = np.stack(visible).astype(np.uint8)
        layout = [
            {"joints": j, "height": h, "colour": tuple(float(c) for c in colour),
             "visible_fraction": float(v.sum() / f.sum())}
            for (j, h), colour, f, v in zip(placed, colours, full, visible)
        ]  # fmt: skip
        item = {
            "image": np.ascontiguousarray(image),
            "boxes": masks_to_boxes(masks),
            "labels": np.ones(len(full), np.int64),
            "masks": masks,
            "keypoints": keypoint_visibility(joints, full, (height, width)),
            "image_id": index,
        }
        return item, layout

    def _place(self, rng, full, visible):
        """``(full mask, (joints, height))`` of a random figure that leaves every figure at
        least ``min_visible`` visible, or None after 100 tries."""
        height, width = self.image_size
        for _ in range(100):
            figure_height = rng.uniform(*self.height_range)
            joints = _random_joints(rng, figure_height)
            low, high = joints.min(axis=0), joints.max(axis=0)
            margin = self.outside * (high - low)
            offset = np.empty(2)
            for axis, size in enumerate((width, height)):
                lo, hi = -low[axis] - margin[axis], size - high[axis] + margin[axis]
                offset[axis] = rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2
            joints = joints + offset
            canvas, origin = _figure_canvas(joints, figure_height)
            mask = _in_image(canvas, origin, (height, width))
            if mask.sum() < self.min_visible * canvas.sum():
                continue  # too much of it outside the image
            if all((v & ~mask).sum() >= self.min_visible * f.sum() for v, f in zip(visible, full)):
                return mask, (joints, figure_height)
        return None


def _random_joints(rng, h: float) -> np.ndarray:
    """``(K, 2)`` joints of a random frontal pose of height ``h``, pelvis at the origin.

    Angles (degrees; limbs measured from hanging straight down along the torso, positive away
    from the body): torso lean [-20, 20], head tilt [-25, 25], upper arm [-15, 165], elbow
    bend [-40, 130] (the forearm kept within [-40, 190]), thigh [-10, 50], knee bend
    [-40, 60] (the shin within [-25, 80]); shoulders drop up to 0.03 h.
    """
    lean = np.deg2rad(rng.uniform(-20, 20))
    up = np.array([np.sin(lean), -np.cos(lean)])  # pelvis -> neck (y grows downwards)
    side = np.array([np.cos(lean), np.sin(lean)])  # towards the figure's left (image right)
    joints = np.zeros((NUM_KEYPOINTS, 2))
    neck = _TORSO * h * up
    tilt = np.deg2rad(rng.uniform(-25, 25))
    joints[0] = neck + _NECK * h * (np.cos(tilt) * up + np.sin(tilt) * side)
    joints[1] = neck
    for s, (shoulder, elbow, hand, hip, knee, foot) in (
        (1.0, (2, 4, 6, 8, 10, 12)),
        (-1.0, (3, 5, 7, 9, 11, 13)),
    ):
        out = s * side

        def limb(degrees, out=out):
            a = np.deg2rad(degrees)
            return -np.cos(a) * up + np.sin(a) * out  # unit vector, 0 = down along the torso

        joints[shoulder] = neck + _SHOULDER * h * out - rng.uniform(0, 0.03) * h * up
        arm = rng.uniform(-15, 165)
        joints[elbow] = joints[shoulder] + _UPPER_ARM * h * limb(arm)
        forearm = np.clip(arm + rng.uniform(-40, 130), -40, 190)
        joints[hand] = joints[elbow] + _FOREARM * h * limb(forearm)
        joints[hip] = _HIP * h * out
        thigh = rng.uniform(-10, 50)
        joints[knee] = joints[hip] + _THIGH * h * limb(thigh)
        joints[foot] = joints[knee] + _SHIN * h * limb(
            np.clip(thigh + rng.uniform(-40, 60), -25, 80)
        )
    return joints


def figure_mask(joints: np.ndarray, h: float, size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the stick figure with ``joints`` ``(K, 2)`` and height ``h``:
    the union of its capsules (limbs, shoulders, hips, torso) and head disc. A pixel is inside
    when its centre is within a capsule's radius of its segment."""
    return _in_image(*_figure_canvas(joints, h), size)


def _figure_canvas(joints, h):
    """``(canvas, (x0, y0))``: the whole figure drawn on a canvas around its joints, also the
    part outside any image; canvas pixel ``(r, c)`` is pixel ``(y0 + r, x0 + c)``."""
    pad = int(np.ceil((_HEAD_RADIUS + 0.01) * h)) + 1
    x0, y0 = (int(v) - pad for v in np.floor(joints.min(axis=0)))
    x1, y1 = (int(v) + pad for v in np.ceil(joints.max(axis=0)))
    canvas = np.zeros((y1 - y0, x1 - x0), bool)
    local = joints - (x0, y0)
    pelvis = (local[8] + local[9]) / 2
    for a, b, radius in _CAPSULES:
        _draw_capsule(canvas, local[a], pelvis if b < 0 else local[b], radius * h)
    _draw_capsule(canvas, local[0], local[0], _HEAD_RADIUS * h)
    return canvas, (x0, y0)


def _in_image(canvas, origin, size) -> np.ndarray:
    """The part of a figure's canvas inside an image of ``size`` ``(H, W)``."""
    height, width = size
    x0, y0 = origin
    mask = np.zeros(size, bool)
    rows = slice(max(y0, 0), min(y0 + canvas.shape[0], height))
    cols = slice(max(x0, 0), min(x0 + canvas.shape[1], width))
    if rows.start < rows.stop and cols.start < cols.stop:
        mask[rows, cols] = canvas[
            rows.start - y0 : rows.stop - y0, cols.start - x0 : cols.stop - x0
        ]
    return mask


def _draw_capsule(mask, p, q, radius) -> None:
    """Set the pixels of ``mask`` whose centres lie within ``radius`` of the segment ``pq``."""
    height, width = mask.shape
    x0 = max(int(np.floor(min(p[0], q[0]) - radius)), 0)
    x1 = min(int(np.ceil(max(p[0], q[0]) + radius)) + 1, width)
    y0 = max(int(np.floor(min(p[1], q[1]) - radius)), 0)
    y1 = min(int(np.ceil(max(p[1], q[1]) + radius)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    px = np.arange(x0, x1) + 0.5 - p[0]
    py = np.arange(y0, y1)[:, None] + 0.5 - p[1]
    d = np.asarray(q, np.float64) - p
    length2 = float(d @ d)
    t = np.clip((px * d[0] + py * d[1]) / length2, 0.0, 1.0) if length2 > 0 else 0.0
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2
    mask[y0:y1, x0:x1] |= dist2 <= radius * radius


def keypoint_visibility(joints, full_masks, size) -> np.ndarray:
    """``(G, K, 3)`` float32 COCO keypoints of figures ``joints`` (list of ``(K, 2)``) drawn in
    this order: ``v = 0`` and ``(0, 0)`` outside the image, ``v = 1`` where a later figure's
    mask covers the joint's pixel, else ``v = 2``."""
    height, width = size
    out = np.zeros((len(joints), NUM_KEYPOINTS, 3), np.float32)
    for g, figure in enumerate(joints):
        cols, rows = np.floor(figure[:, 0]), np.floor(figure[:, 1])
        inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        r, c = rows[inside].astype(int), cols[inside].astype(int)
        covered = np.zeros(int(inside.sum()), bool)
        for later in full_masks[g + 1 :]:
            covered |= later[r, c]
        out[g, inside, :2] = figure[inside]
        out[g, inside, 2] = np.where(covered, 1, 2)
    return out
