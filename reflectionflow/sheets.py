"""Contact sheets: images in a grid, each enlarged to a readable size with its caption wrapped beneath it,
dark text on white (a search's chains x rounds, validation panels, the shapes recipes' sample sheets).

A sheet carries its title, row and column labels and captions as PNG text (`png_bytes`;
`Image.open(path).text` reads them back), so what a sheet shows can be searched and checked without
reading pixels."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

Cell = tuple[Image.Image | None, str]  # an image (None: an empty place) and its caption


def _wrap(text: str, chars: int, max_lines: int | None) -> list[str]:
    """`text` wrapped to `chars` per line (newlines kept), cut to `max_lines` with an ellipsis."""
    lines = [part for paragraph in text.split("\n") for part in (textwrap.wrap(paragraph, chars) or [""])]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 1] + "…"
    return lines


def contact_sheet(
    rows: Sequence[Sequence[Cell]],
    *,
    cell: int = 192,
    font_size: int = 13,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    max_caption_lines: int | None = None,
) -> Image.Image:
    """One PNG-ready sheet: `rows` of (image, caption) cells, each image scaled to `cell` pixels wide
    (nearest-neighbour, so small images stay crisp) and its caption wrapped to the cell's width below
    (at most `max_caption_lines` lines; the PNG text keeps it whole). The title wraps to the sheet's width."""
    font = ImageFont.load_default(size=font_size)
    line = font_size + 4
    chars = max(8, int(cell / (0.55 * font_size)))
    wrapped = [[_wrap(caption, chars, max_caption_lines) for _, caption in row] for row in rows]
    caption_lines = max((len(lines) for row in wrapped for lines in row), default=1)
    columns = max((len(row) for row in rows), default=1)
    label_width = 0 if row_labels is None else max(font.getlength(label) for label in row_labels) + 12
    pad = 8
    width = int(label_width) + columns * (cell + pad) + pad
    title_lines = _wrap(title, max(8, int((width - 2 * pad) / (0.55 * font_size))), None) if title else []
    top = (len(title_lines) * line + 8 if title else 0) + (line + 4 if column_labels else 0)
    height_per_row = cell + caption_lines * line + pad
    sheet = Image.new("RGB", (width, top + len(rows) * height_per_row + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for text in title_lines:
        draw.text((pad, y), text, fill=(0, 0, 0), font=font)
        y += line
    if title:
        y += 8
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
    sheet.info["Title"] = title or ""
    sheet.info["Rows"] = " | ".join(row_labels or [])
    sheet.info["Columns"] = " | ".join(column_labels or [])
    sheet.info["Description"] = "\n\n".join(caption for row in rows for _, caption in row if caption)
    return sheet


def png_bytes(sheet: Image.Image) -> bytes:
    """The sheet as PNG with its title, labels and captions (`contact_sheet` keeps them in `sheet.info`)
    as text."""
    text = PngInfo()
    for key in ("Title", "Rows", "Columns", "Description"):
        if sheet.info.get(key):
            text.add_itxt(key, sheet.info[key])
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", pnginfo=text)
    return buffer.getvalue()
