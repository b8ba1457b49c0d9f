"""Scene -> RGB image, antialiased by drawing at 4x and averaging down."""

from __future__ import annotations

from PIL import Image, ImageDraw

from reflectionflow.shapes.world.scene import Scene
from reflectionflow.shapes.world.vocabulary import BACKGROUND, COLORS, DEFAULT_SIZE, SHAPES

SUPERSAMPLE = 4


def render_scene(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Draw `scene` on a plain background, `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if obj.shape not in SHAPES or obj.color not in COLORS:
            raise ValueError(f"cannot render an object of unknown shape or colour: {obj}")
        x0, y0, x1, y1 = (v * big for v in obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up, base = height = size
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
