"""Contact sheets: readable captions that grow the sheet, and the captions kept as PNG text."""

from __future__ import annotations

import io

from PIL import Image

from reflectionflow.models.callbacks import validation_sheet
from reflectionflow.sheets import contact_sheet, png_bytes


def held_out(prompt: str, reflection: str) -> dict:
    return {
        "prompt": prompt,
        "reflection": reflection,
        "image": Image.new("RGB", (64, 64), "red"),
        "condition": Image.new("RGB", (32, 32), "blue"),
    }


def test_a_longer_caption_makes_the_validation_sheet_taller_and_is_kept_as_png_text():
    corrected = [Image.new("RGB", (64, 64), "green")]
    short = validation_sheet([held_out("a red cube", "Make it red.")], corrected, step=5, cell=128)
    reflection = "Move the cube to the left and make the sphere behind it twice as large. " * 3
    long = validation_sheet([held_out("a red cube", reflection)], corrected, step=5, cell=128)
    assert long.height > short.height and long.width == short.width == 3 * (128 + 8) + 8
    with Image.open(io.BytesIO(png_bytes(long))) as image:
        assert image.text["Title"] == "step 5: held-out flawed | corrected | target"
        assert image.text["Columns"] == "flawed | corrected | target"
        assert (
            image.text["Description"] == f"prompt: a red cube\n\nreflection: {reflection}"
        )  # whole, not cut


def test_captions_are_cut_to_max_lines_and_the_title_wraps():
    cell = Image.new("RGB", (8, 8))
    text = "word " * 200
    cut = contact_sheet([[(cell, text)]], cell=96, max_caption_lines=3)
    full = contact_sheet([[(cell, text)]], cell=96)
    assert cut.height < full.height
    titled = contact_sheet([[(cell, "")]], cell=96, title="a long prompt " * 20)
    assert titled.height > contact_sheet([[(cell, "")]], cell=96, title="short").height
