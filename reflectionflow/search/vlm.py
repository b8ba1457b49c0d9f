"""`VLMVerifier`: the probability a local vision-language model answers "yes" to "Does this image match
the prompt?" (the NVILA / Qwen-VL verifier style), through transformers' Auto classes and chat template."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from reflectionflow.search.budget import Usage
from reflectionflow.search.errors import SetupError
from reflectionflow.search.verifiers import Score

DEFAULT_QUESTION = 'Does this image match the prompt "{prompt}"? Answer yes or no.'


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Ids of single tokens that read as `word` (any case, with or without a leading space)."""
    ids = set()
    for variant in (word, f" {word}", word.capitalize(), f" {word.capitalize()}"):
        tokens = tokenizer.encode(variant, add_special_tokens=False)
        if tokens and tokenizer.decode(tokens[:1]).strip().lower() == word:
            ids.add(tokens[0])
    return sorted(ids)


class VLMVerifier:
    """value = P(yes) / (P(yes) + P(no)) for the first answer token; `details` keeps both raw probabilities.

    `model_path` is a hub id or local directory of any image-text-to-text model with a chat template.
    Images are scored one at a time (models differ in how many image tokens an image becomes), in a worker
    thread so the event loop keeps serving API calls.
    """

    def __init__(
        self,
        model_path: str,
        question: str = DEFAULT_QUESTION,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_path)
            self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=getattr(torch, dtype))
        except OSError as err:
            raise SetupError(
                f"cannot load vision-language model {model_path!r} ({err}); set verifier.model_path"
            ) from None
        self.model.to(device).eval()
        self.question = question
        tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, "yes")
        self.no_ids = answer_token_ids(tokenizer, "no")
        if not self.yes_ids or not self.no_ids:
            raise SetupError(f"{model_path}: the tokenizer has no single token for 'yes' and 'no'")
        if getattr(self.processor, "chat_template", None) is None:
            raise SetupError(f"{model_path}: the processor has no chat template")
        self._lock = threading.Lock()

    async def score(self, images: Sequence[Image.Image], prompt: str, meta: Mapping[str, Any]) -> list[Score]:
        return await asyncio.to_thread(self._score_all, list(images), prompt)

    def _score_all(self, images: list[Image.Image], prompt: str) -> list[Score]:
        with self._lock:
            return [self._score_one(image, prompt) for image in images]

    @torch.no_grad()
    def _score_one(self, image: Image.Image, prompt: str) -> Score:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image.convert("RGB")},
                    {"type": "text", "text": self.question.format(prompt=prompt)},
                ],
            }
        ]
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device, dtype=self.model.dtype)
        probs = self.model(**inputs).logits[0, -1].float().softmax(-1)
        p_yes, p_no = probs[self.yes_ids].sum().item(), probs[self.no_ids].sum().item()
        value = p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5
        return Score(value, {"p_yes": p_yes, "p_no": p_no}, usage=Usage(calls=1, attempts=1))
