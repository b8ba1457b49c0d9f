"""`RemoteCodeYesNoVerifier`: yes/no verifiers that ship their own model code, such as SANA's
NVILA-Lite-2B-Verifier, loaded and ranked the way ReflectionFlow's scripts do (`tts/verifiers/nvila_verifier.py`,
`tts/tts_reflectionflow.py`).

The model is `transformers.AutoModel.from_pretrained(path, trust_remote_code=True)` and answers
`answer, scores = model.generate_content([image, prompt])`; `scores[0][0, token]` is the first generated
token's score. The paper ranks "yes" images first, by descending score of "yes", then "no" images by
ascending score of "no". That order is one number here, so the engine can rank it like any other score:
value = 0.75 + atan(yes score) / 2pi for a "yes", 0.25 - atan(no score) / 2pi for a "no" (a "yes" is
exactly value > 0.5; atan, unlike a sigmoid, still tells logits of hundreds apart); `details` keep the
label and the raw score.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.errors import SetupError
from reflectionflow.search.verifiers import Score

ENVIRONMENT_HINT = (
    "NVILA-Lite-2B-Verifier's code is written for transformers 4.46 with scaling-on-scales; "
    "docs/search.md 'The NVILA verifier' describes that environment"
)


def yes_no_value(label: str, score: float) -> float:
    """The paper's order (yes by descending score, then no by ascending score) as a value in (0, 1)."""
    turn = math.atan(score) / (2 * math.pi)  # in (-1/4, 1/4)
    return 0.75 + turn if label == "yes" else 0.25 - turn


class RemoteCodeYesNoVerifier:
    """Scores each image with a remote-code yes/no model; see the module docstring.

    trust_remote_code: must be true, an explicit choice: loading runs the model repository's Python code.
    model_kwargs: more `from_pretrained` arguments (the paper: `device_map="auto"`).
    Images are scored one at a time in a worker thread, so the event loop keeps serving API calls.
    """

    def __init__(
        self, model_path: str, trust_remote_code: bool = False, model_kwargs: Mapping[str, Any] | None = None
    ):
        if trust_remote_code is not True:
            raise SetupError(
                f"{model_path} runs its own Python code; set verifier.trust_remote_code=true to allow it"
            )
        import transformers

        try:
            self.model = transformers.AutoModel.from_pretrained(
                model_path, trust_remote_code=True, **dict(model_kwargs or {})
            )
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SetupError(f"cannot load {model_path!r} ({first}); set verifier.model_path") from None
        except Exception as err:  # remote code written for another transformers: any error type
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise SetupError(
                f"transformers {transformers.__version__} cannot load the remote-code model {model_path!r} "
                f"({type(err).__name__}: {first}); {ENVIRONMENT_HINT}"
            ) from None
        if not callable(getattr(self.model, "generate_content", None)) or not hasattr(self.model, "tokenizer"):
            raise SetupError(f"{model_path} has no generate_content() and tokenizer; it is not a yes/no verifier")
        self.model.eval()
        encode = self.model.tokenizer.encode
        self.token_ids = {word: encode(word, add_special_tokens=False)[0] for word in ("yes", "no")}
        self._lock = threading.Lock()

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        return await asyncio.to_thread(self._score_all, list(images), prompt)

    def _score_all(self, images: list[Image.Image], prompt: str) -> list[Score]:
        import torch

        with self._lock, torch.no_grad():
            return [self._score_one(image, prompt) for image in images]

    def _score_one(self, image: Image.Image, prompt: str) -> Score:
        answer, scores = self.model.generate_content([image.convert("RGB"), prompt])
        label = "yes" if answer == "yes" else "no"  # the paper's test: exactly "yes"
        score = float(scores[0][0, self.token_ids[label]])
        details = {"label": label, "score": score, "answer": answer}
        return Score(yes_no_value(label, score), details, usage=Usage(calls=1, attempts=1))
