"""Image -> detected scene: foreground segmentation, connected components, colour and shape features.

Every pixel is explained as the background mixed with one palette colour (alpha) plus a residual. A
pixel whose best mix has alpha >= 0.5 is foreground; an antialiased or blurred rim is exactly such a
mix, so the mask is about the true shape. One connected foreground region is one object, whatever
colours it holds (a dark-red square whose pixels are partly closer to black, a square with a core of
another colour); its colour is the palette colour that explains its pixels best, or none (off-palette)
when even that one leaves a mean residual above MAX_COLOR_RESIDUAL, as a person would say "a square"
of a colour outside the palette.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from reflectionflow.shapes.world.scene import Scene, ShapeObject
from reflectionflow.shapes.world.vocabulary import COLORS

MIN_OBJECT_AREA = 0.005
"""Smallest component counted as an object, as a fraction of the image (a quarter of the smallest
triangle): smaller specks are noise."""

MAX_COLOR_RESIDUAL = 70.0
"""Mean RGB distance of an object's pixels from the nearest background-to-colour line beyond which the
object has no palette colour."""

TRIANGLE_SKEW = -0.12
"""Vertical skewness of a component's colour mass below which it is an (apex-up) triangle. A triangle's
is -0.57, circles' and squares' 0; Gaussian blur keeps the third moment and only adds variance, so even a
blurred triangle stays near -0.3."""

SQUARE_CORNERS = 0.5
"""Mean alpha in the bounding box's corners (outside its inscribed ellipse) relative to inside it, above
which a component is a square: about 1 for a square, 0.2 for a circle, both drifting to 0.5 under blur."""

MAX_ASPECT = 1.6
"""Components stretched more than this (two touching shapes, smears) have no known shape."""

AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
"""Area of each shape relative to its bounding box: turns the colour mass into a sub-pixel size."""

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    obj: ShapeObject
    area: int  # pixels with alpha >= 0.5
    skew: float  # see TRIANGLE_SKEW
    corners: float  # see SQUARE_CORNERS


def detect_objects(image: Image.Image) -> list[Detection]:
    """Objects in `image`, in raster order of their first pixel."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = rgb.shape
    alpha, residual, foreground = _unmix(rgb)
    components = _connected_components(foreground)
    ids, areas = np.unique(components.ravel(), return_counts=True)  # id - 1 = first pixel: raster order
    min_area = MIN_OBJECT_AREA * height * width
    detections = []
    for component, area in zip(ids, areas, strict=True):
        if component == 0 or area < min_area:
            continue
        mask = components == component
        mean_residual = residual[mask].mean(axis=0)  # per palette colour
        best = int(mean_residual.argmin())
        color = _NAMES[best] if mean_residual[best] <= MAX_COLOR_RESIDUAL else None
        # The object's colour mass: its alpha over the component and the background rim around it.
        weights = alpha[..., best] if color else mask.astype(np.float32)
        weights = weights * (_dilate(mask, 2) & (~foreground | mask))
        detections.append(_measure(mask, weights, color, int(area)))
    return detections


def detect_scene(image: Image.Image) -> Scene:
    return Scene(tuple(d.obj for d in detect_objects(image)))


def _unmix(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel and palette colour, the alpha of that colour over the background and the residual of that
    mix (both (H, W, K)); and the foreground mask: pixels whose best-explaining colour has alpha >= 0.5."""
    background = np.median(rgb.reshape(-1, 3), axis=0)
    offset = rgb - background  # (H, W, 3)
    direction = _PALETTE - background  # (K, 3)
    alpha = np.clip(offset @ direction.T / (direction**2).sum(1), 0.0, 1.0)  # (H, W, K)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * direction, axis=-1)
    best = residual.argmin(-1)[..., None]
    foreground = np.take_along_axis(alpha, best, -1)[..., 0] >= 0.5
    return alpha, residual, foreground


def _measure(mask: np.ndarray, weights: np.ndarray, color: str | None, area: int) -> Detection:
    """Shape from the mass's vertical skewness and corner occupancy; position and size from its
    moments (blur-invariant and sub-pixel), falling back to the bounding box for unknown shapes."""
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box_h, box_w = r1 - r0, c1 - c0
    mass = float(weights.sum())
    y = np.arange(height)[:, None] + 0.5
    x = np.arange(width)[None, :] + 0.5
    my, mx = float((weights * y).sum() / mass), float((weights * x).sum() / mass)
    var_y = float((weights * (y - my) ** 2).sum() / mass)
    skew = float((weights * (y - my) ** 3).sum() / mass / max(var_y, 1e-6) ** 1.5)
    inside = ((x[:, c0:c1] - c0) / box_w - 0.5) ** 2 + ((y[r0:r1] - r0) / box_h - 0.5) ** 2 <= 0.25
    box = weights[r0:r1, c0:c1]
    corners = float(box[~inside].mean() / max(box[inside].mean(), 1e-6)) if (~inside).any() else 0.0

    shape: str | None
    # Stretched, or mass piled at the top (an upside-down triangle): nothing this world draws.
    if max(box_h, box_w) > MAX_ASPECT * min(box_h, box_w) or skew > -TRIANGLE_SKEW:
        shape = None
    elif skew < TRIANGLE_SKEW:
        shape = "triangle"
    else:
        shape = "square" if corners >= SQUARE_CORNERS else "circle"
    if shape is None:
        obj = ShapeObject(
            None, color, (c0 + c1) / 2 / width, (r0 + r1) / 2 / height, (box_w / width + box_h / height) / 2
        )
    else:
        side = float(np.sqrt(mass / AREA_FRACTION[shape]))
        centre_y = (
            my - side / 6 if shape == "triangle" else my
        )  # a triangle's centroid sits 1/6 below its box centre
        obj = ShapeObject(shape, color, mx / width, centre_y / height, side / width)
    return Detection(obj, area, skew, corners)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def _connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected regions of `mask`. Each pixel ends with 1 + the flat index of its region's first pixel
    (0 outside the mask): neighbour minima plus pointer jumping, a few passes."""
    height, width = mask.shape
    padded_mask = np.pad(mask, 1)
    shifts = [
        (slice(1 + dy, 1 + dy + height), slice(1 + dx, 1 + dx + width))
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    ]
    links = [(rows, cols, padded_mask[rows, cols] & mask) for rows, cols in shifts]
    ids = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    while True:
        padded = np.pad(ids, 1)
        new = ids.copy()
        for rows, cols, same in links:
            neighbour = padded[rows, cols]
            np.copyto(new, neighbour, where=same & (neighbour < new))
        new = np.concatenate([[0], new.ravel()])[new]  # jump to the label of the pixel we point at
        if np.array_equal(new, ids):
            return ids
        ids = new
