"""The corrector's text pair: CLIP sees the prompt, T5 sees the prompt with the reflection appended."""

from __future__ import annotations

REFLECTION_SEPARATOR = " [Reflexion] "


def t5_text(prompt: str, reflection: str | None) -> str:
    """T5 text of the paper's corrector: `"{prompt} [Reflexion] {reflection}"`, or the prompt alone."""
    if reflection:
        return f"{prompt}{REFLECTION_SEPARATOR}{reflection}"
    return prompt


def corrector_text_pair(prompt: str, reflection: str | None) -> tuple[str, str]:
    """(CLIP text, T5 text). The pooled CLIP embedding always comes from the original prompt alone."""
    return prompt, t5_text(prompt, reflection)
