"""Contact sheets: images in a grid, each enlarged to a readable size with its caption wrapped beneath it,
dark text on white (a search's chains x rounds, validation panels, the shapes recipes' sample sheets)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Cell = tuple[Image.Image | None, str]  # an image (None: an empty place) and its caption


def contact_sheet(
    rows: Sequence[Sequence[Cell]],
    *,
    cell: int = 192,
    font_size: int = 13,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """One PNG-ready sheet: `rows` of (image, caption) cells, each image scaled to `cell` pixels wide
    (nearest-neighbour, so small images stay crisp) and its caption wrapped to the cell's width below."""
    font = ImageFont.load_default(size=font_size)
    line = font_size + 4
    chars = max(8, int(cell / (0.55 * font_size)))
    wrapped = [[textwrap.wrap(caption, chars) or [""] for _, caption in row] for row in rows]
    caption_lines = max((len(lines) for row in wrapped for lines in row), default=1)
    columns = max((len(row) for row in rows), default=1)
    label_width = 0 if row_labels is None else max(font.getlength(label) for label in row_labels) + 12
    top = (line + 8 if title else 0) + (line + 4 if column_labels else 0)
    pad = 8
    height_per_row = cell + caption_lines * line + pad
    sheet = Image.new("RGB", (int(label_width) + columns * (cell + pad) + pad, top + len(rows) * height_per_row
                              + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), title, fill=(0, 0, 0), font=font)
        y += line + 8
    if column_labels:
        for c, label in enumerate(column_labels):
            draw.text((label_width + pad + c * (cell + pad), y), label, fill=(60, 60, 60), font=font)
    for r, (row, row_wrapped) in enumerate(zip(rows, wrapped, strict=True)):
        y0 = top + pad + r * height_per_row
        if row_labels is not None:
            draw.text((pad, y0 + cell // 2), row_labels[r], fill=(60, 60, 60), font=font)
        for c, ((image, _), lines) in enumerate(zip(row, row_wrapped, strict=True)):
            x0 = int(label_width) + pad + c * (cell + pad)
            if image is not None:
                scaled = image.convert("RGB").resize((cell, round(cell * image.height / image.width)),
                                                     Image.Resampling.NEAREST)
                sheet.paste(scaled.crop((0, 0, cell, min(cell, scaled.height))), (x0, y0))
                draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), outline=(200, 200, 200))
            for k, text in enumerate(lines):
                draw.text((x0, y0 + cell + 2 + k * line), text, fill=(0, 0, 0), font=font)
    return sheet
