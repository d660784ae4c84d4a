"""A PNG of search results: one row per query (the query, then its top results), so a user can look at what
a model retrieves. With labels, each result is framed green (same class as the query) or red (another)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from msretrieval.data.images import ImageLoadError, load_image
from msretrieval.utils.errors import UserError

QUERY_COLOUR, CORRECT, WRONG, UNKNOWN = (40, 90, 220), (30, 160, 60), (210, 40, 40), (170, 170, 170)


@dataclass
class SheetRow:
    query: Path
    results: Sequence[Path]
    scores: Sequence[float]
    correct: Sequence[bool | None] | None = None  # None: labels unknown


def thumbnail(path: Path, size: int) -> Image.Image:
    """The image fitted into a size x size square on grey (aspect ratio kept); a grey tile if unreadable."""
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        image = ImageOps.contain(load_image(path), (size, size))
    except ImageLoadError:
        return tile
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def contact_sheet(rows: Sequence[SheetRow], path: str | Path, tile: int = 128, border: int = 5) -> Path:
    """Write the sheet to ``path`` (PNG) and return it."""
    if not rows:
        raise UserError("no search results to draw")
    columns = 1 + max(len(row.results) for row in rows)
    cell, caption, gap = tile + 2 * border, 14, 12
    sheet = Image.new("RGB", (columns * cell + gap, len(rows) * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (cell + caption)
        frames = [(row.query, QUERY_COLOUR, "query")]
        for i, (result, score) in enumerate(zip(row.results, row.scores)):
            verdict = None if row.correct is None else row.correct[i]
            colour = UNKNOWN if verdict is None else CORRECT if verdict else WRONG
            frames.append((result, colour, f"{i + 1}: {score:.3f}"))
        for c, (image_path, colour, text) in enumerate(frames):
            left = c * cell + (gap if c else 0)
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
            sheet.paste(thumbnail(Path(image_path), tile), (left + border, top + border))
            draw.text((left + border, top + cell), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
