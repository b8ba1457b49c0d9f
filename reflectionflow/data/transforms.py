"""Paired preprocessing of a GenRef sample (flawed + enhanced image) and the paper's random drops.

Geometry, as in the paper's code: the flawed image is resized to the good image's size, both are scaled so
the short side is `target_size`, the same random `target_size` square is cropped from both, and the flawed
crop is resized to `condition_size`. We compute that crop once as a box in each image's own pixel
coordinates and resample each image a single time (PIL `resize(box=...)`), and let libjpeg decode at 1/2,
1/4 or 1/8 scale (`Image.draft`) when the output is that much smaller: the same geometry, one resampling
instead of three, and much less decoding work.

Values: batches leave the dataloader workers as uint8 (B, 3, H, W) (`stack_images`: a quarter of the
inter-process and host-to-device traffic of float32) and become float32 in [-1, 1] on the training device
(`to_model_range`); a dropped condition is black (0, then -1).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from reflectionflow.data.sources import IMAGE_KEYS

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
MIN_REFLECTION_CHARS = 5
REFLECTION_SEPARATOR = " [Reflexion] "


def t5_text(prompt: str, reflection: str | None) -> str:
    """T5 text of the paper's corrector: `"{prompt} [Reflexion] {reflection}"`, or the prompt alone.

    Training (after the drops) and the pipeline at inference both build it here; the pooled CLIP
    embedding always comes from the original prompt alone."""
    if reflection:
        return f"{prompt}{REFLECTION_SEPARATOR}{reflection}"
    return prompt


@dataclass(frozen=True)
class DropRates:
    """Independent drop probabilities of the paper's code (text 0.1, image 0.1, reflection 0.2)."""

    text: float = 0.1
    image: float = 0.1
    reflection: float = 0.2

    def __post_init__(self) -> None:
        for name in ("text", "image", "reflection"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.drop_{name} must be in [0, 1], got {getattr(self, name)}")


def choose_t5_text(
    prompt: str, reflection: str, subset: str, draws: np.ndarray, drops: DropRates
) -> tuple[str, bool]:
    """(T5 text actually used, whether the condition image is dropped) from three uniform draws.

    Reflection drop (or a reflection under 5 characters) and image drop (never for `editing`) leave the
    prompt alone; text drop makes the T5 text empty. The CLIP text is always the prompt (not decided here).
    """
    drop_text = draws[0] < drops.text
    drop_image = draws[1] < drops.image and subset != "editing"
    drop_reflection = draws[2] < drops.reflection or len(reflection) < MIN_REFLECTION_CHARS
    if drop_text:
        return "", drop_image
    if drop_image or drop_reflection:
        return prompt, drop_image
    return t5_text(prompt, reflection), drop_image


def target_crop_box(good_size: tuple[int, int], target_size: int, offset: tuple[float, float] | None):
    """The target crop in the good image's pixels: scale short side to `target_size`, crop a square.

    `offset` holds two uniform draws in [0, 1) picking the crop position; None takes the centre.
    """
    width, height = good_size
    scale = target_size / min(width, height)
    scaled_w, scaled_h = math.ceil(width * scale), math.ceil(height * scale)
    if offset is None:
        left, top = (scaled_w - target_size) // 2, (scaled_h - target_size) // 2
    else:
        left = int(offset[0] * (scaled_w - target_size + 1))
        top = int(offset[1] * (scaled_h - target_size + 1))
    return (left / scale, top / scale, (left + target_size) / scale, (top + target_size) / scale)


def _resample(image: Image.Image, box: tuple[float, ...], size: int) -> np.ndarray:
    """The `box` region of a lazily opened image, resampled to `size` x `size` RGB uint8 (H, W, 3)."""
    reduction = (box[2] - box[0]) / size
    if reduction >= 2 and image.format == "JPEG":
        full_width, full_height = image.size
        image.draft("RGB", (math.ceil(full_width / reduction), math.ceil(full_height / reduction)))
        fx, fy = image.width / full_width, image.height / full_height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = [round(v) for v in box]
    whole_pixels = max(abs(p - v) for p, v in zip(pixels, box, strict=True)) < 1e-6
    if whole_pixels and pixels[2] - pixels[0] == size == pixels[3] - pixels[1]:
        return np.array(
            image.crop(pixels)
        )  # scale 1 at whole-pixel offsets: resampling would be the identity
    return np.array(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def decode_pair(
    good_bytes: bytes,
    bad_bytes: bytes,
    target_size: int,
    condition_size: int,
    offset: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(target, condition) uint8 arrays (T, T, 3) and (C, C, 3). Raises one of `DECODE_ERRORS` on bad JPEGs.

    Both images are always decoded, so whether a sample is corrupt never depends on its random drops.
    """
    good = Image.open(io.BytesIO(good_bytes))
    bad = Image.open(io.BytesIO(bad_bytes))
    box = target_crop_box(good.size, target_size, offset)
    sx, sy = bad.width / good.width, bad.height / good.height
    bad_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return _resample(good, box, target_size), _resample(bad, bad_box, condition_size)


def header_pixels(data: bytes) -> float:
    """The pixels an encoded image would decode to, read from its header alone (PIL opens lazily): inf for
    one PIL itself refuses as a decompression bomb, 0 for an unreadable header (decoding reports it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return math.inf
    except DECODE_ERRORS:
        return 0
    return width * height


def sample_pixels(members: dict[str, bytes]) -> float:
    """The pixels the larger image of a raw sample would decode to (`header_pixels`)."""
    return max(header_pixels(members[key]) for key in IMAGE_KEYS)


def default_max_image_pixels(target_size: int, condition_size: int) -> int:
    """Pixels per image a sample may decode to unless `data.max_image_pixels` says otherwise: 8 times the
    training side on each side (8192 x 8192 at 1024), far above what the crops use, far below a bomb's."""
    return (8 * max(target_size, condition_size)) ** 2


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays as one uint8 (B, 3, H, W) tensor (in shared memory inside a dataloader worker)."""
    return default_collate([torch.from_numpy(image).permute(2, 0, 1) for image in images])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, any device) as float32 in [-1, 1]."""
    return images.to(torch.float32).mul_(2 / 255).sub_(1.0)
