"""The fixed vocabulary and geometry of the shapes world.

Images are a 3 x 3 grid of cells on a white background; each object sits inside one cell. Coordinates
are fractions of the image side, so the same scene renders (and is checked) at any resolution.
"""

from __future__ import annotations

DEFAULT_SIZE = 48
"""Default image side in pixels: with the 8x-downsampling VAE a 48 px image is 6 x 6 latents, 3 x 3
packed tokens, and each grid cell (16 x 16 px) is exactly one token."""

BACKGROUND = (255, 255, 255)

# Chosen so that a half-transparent edge pixel of any colour stays >= 58 RGB units away from the
# background-mixing line of every other colour (see `detect.py`): antialiasing and blur cannot turn
# the rim of a red shape into pink or yellow.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 200, 0),
    "green": (20, 170, 40),
    "blue": (20, 80, 230),
    "purple": (150, 30, 200),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle")

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CAPTION = "caption"
"""Tag of a detailed caption's spec: every object with its colour, shape and cell (base-model training text,
like GenRef's long prompts); not an evaluation category."""
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNTS = (2, 3, 4)
MAX_OBJECTS = 4
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

GRID = 3
CELL = 1.0 / GRID
SIZE_RANGE = (0.6 * CELL, 0.85 * CELL)
"""Object side (bounding box) in image fractions: big enough to classify, small enough for a margin."""

MARGIN = 0.02
"""Minimum gap between an object and its cell border, so objects in neighbouring cells never touch."""

LOCATIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
"""Phrase for each (row, column) cell, as reflections say where to add or which object is meant."""

CELLS = tuple(LOCATIONS)


def cell_center(cell: tuple[int, int]) -> tuple[float, float]:
    """(x, y) of a cell's centre."""
    row, col = cell
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def cell_of(x: float, y: float) -> tuple[int, int]:
    """(row, column) of the cell containing point (x, y)."""
    return min(int(y * GRID), GRID - 1), min(int(x * GRID), GRID - 1)
