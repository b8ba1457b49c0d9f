"""A prompt's search as one picture: `<run>/<00000>/search.png` beside `search.json`.

Rows are chains, columns rounds; each image is captioned with its verifier score and the reflection (and
refined prompt) it was made from, the selected one marked. Places a search did not fill (a chain that
stopped at `search.stop_score`) stay empty. The PNG's text holds every caption whole.
"""

from __future__ import annotations

from reflectionflow.search.engine import Candidate, PromptSearch
from reflectionflow.sheets import contact_sheet, png_bytes

MAX_CAPTION_LINES = 9


def _caption(candidate: Candidate, prompt: str, selected: bool) -> str:
    score = "-" if candidate.score is None else f"{candidate.score.value:.3f}"
    if candidate.score is not None and not candidate.score.ok:
        score += " (failed)"
    lines = [f"score {score}" + ("  << selected" if selected else "")]
    if candidate.reflection:
        lines.append(f"reflection: {candidate.reflection}")
    elif candidate.round == 0:
        lines.append("base model")
    if candidate.prompt != prompt:
        lines.append(f"prompt: {candidate.prompt}")
    return "\n".join(lines)


def search_sheet_png(search: PromptSearch) -> bytes:
    """The contact sheet of one prompt's search, as PNG bytes with its captions as text."""
    made = {(c.round, c.chain): c for c in search.candidates}
    chains = max(search.config.width, 1 + max(chain for _, chain in made))
    rounds = max(search.config.depth + 1, 1 + max(round_ for round_, _ in made))
    best = (search.best.round, search.best.chain)
    prompt = search.item.prompt
    rows = [
        [
            (made[(r, c)].image, _caption(made[(r, c)], prompt, (r, c) == best))
            if (r, c) in made
            else (None, "")
            for r in range(rounds)
        ]
        for c in range(chains)
    ]
    title = (
        f"{prompt}  |  selected: round {best[0]}, chain {best[1]}, score {search.best.score.value:.3f}"
        f"{'  |  stopped at the stop score' if search.stopped else ''}"
    )
    sheet = contact_sheet(
        rows,
        title=title,
        row_labels=[f"chain {c}" for c in range(chains)],
        column_labels=["round 0 (base)"] + [f"round {r}" for r in range(1, rounds)],
        max_caption_lines=MAX_CAPTION_LINES,
    )
    return png_bytes(sheet)
