"""Paired geometry against the paper's step-by-step resizes, and the drop rules."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from reflectionflow.data.transforms import (
    DropRates,
    choose_t5_text,
    decode_pair,
    target_crop_box,
    to_model_range,
)


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _smooth_image(width: int, height: int, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + phase), np.cos(5 * y - phase), np.sin(4 * (x + y) + 2 * phase)]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def _paper_pair(good: Image.Image, bad: Image.Image, target: int, condition: int, left: int, top: int):
    """The paper's code: bad to good's size, both scaled (short side = target), same crop, bad to condition."""
    width, height = good.size
    bad = bad.resize((width, height), Image.BICUBIC)
    scale = target / min(width, height)
    size = (math.ceil(width * scale), math.ceil(height * scale))
    good, bad = good.resize(size, Image.BICUBIC), bad.resize(size, Image.BICUBIC)
    box = (left, top, left + target, top + target)
    return np.asarray(good.crop(box)), np.asarray(bad.crop(box).resize((condition, condition), Image.BICUBIC))


@pytest.mark.parametrize(
    ("good_size", "bad_size", "target", "condition"),
    [((160, 120), (80, 60), 96, 48), ((120, 160), (120, 160), 64, 32), ((128, 128), (96, 96), 128, 64)],
)
def test_single_resampling_matches_the_papers_three_resizes(good_size, bad_size, target, condition):
    good, bad = _smooth_image(*good_size, 0.0), _smooth_image(*bad_size, 1.0)
    offset = (0.7, 0.3)
    image, cond = decode_pair(_jpeg(good), _jpeg(bad), target, condition, offset)
    assert image.shape == (target, target, 3) and cond.shape == (condition, condition, 3)

    scale = target / min(good_size)
    left = int(offset[0] * (math.ceil(good_size[0] * scale) - target + 1))
    top = int(offset[1] * (math.ceil(good_size[1] * scale) - target + 1))
    reference = _paper_pair(
        Image.open(io.BytesIO(_jpeg(good))), Image.open(io.BytesIO(_jpeg(bad))), target, condition, left, top
    )
    assert np.abs(image.astype(int) - reference[0]).mean() < 2.5
    assert np.abs(cond.astype(int) - reference[1]).mean() < 2.5


def test_crop_box_is_centred_without_an_offset_and_spans_the_range_with_one():
    assert target_crop_box((200, 100), 50, None) == (50.0, 0.0, 150.0, 100.0)
    assert target_crop_box((200, 100), 50, (0.0, 0.0))[0] == 0
    assert target_crop_box((200, 100), 50, (0.9999, 0.0))[2] == 200


def test_drop_rules():
    drops = DropRates(text=0.5, image=0.5, reflection=0.5)
    keep, drop = 0.9, 0.1
    full = "a cat [Reflexion] Make it orange."
    assert choose_t5_text("a cat", "Make it orange.", "general", [keep, keep, keep], drops) == (full, False)
    assert choose_t5_text("a cat", "Make it orange.", "general", [keep, keep, drop], drops) == (
        "a cat",
        False,
    )
    assert choose_t5_text("a cat", "Make it orange.", "general", [keep, drop, keep], drops) == ("a cat", True)
    assert choose_t5_text("a cat", "Make it orange.", "editing", [keep, drop, keep], drops) == (full, False)
    assert choose_t5_text("a cat", "Make it orange.", "general", [drop, drop, keep], drops) == ("", True)
    assert choose_t5_text("a cat", "ok", "general", [keep, keep, keep], drops) == ("a cat", False)
    with pytest.raises(ValueError, match="drop_text"):
        DropRates(text=1.5)


def test_model_range():
    values = to_model_range(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert values.dtype == torch.float32
    assert values.tolist() == pytest.approx([-1.0, 1.0, -0.6])
