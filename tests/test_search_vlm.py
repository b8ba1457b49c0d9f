"""`verifier=vlm` with a tiny randomly initialised LLaVA built locally."""

from __future__ import annotations

import asyncio

import pytest
from helpers.tiny_vlm import build_tiny_llava
from PIL import Image

from reflectionflow.search.errors import SetupError
from reflectionflow.search.vlm import VLMVerifier


@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def test_vlm_verifier_returns_yes_probabilities(tiny_vlm_path):
    verifier = VLMVerifier(str(tiny_vlm_path))
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGBA", (20, 40), (0, 0, 255, 128))]
    scores = asyncio.run(verifier.score(images, "a photo of a red cat", {"tag": "colors"}))
    assert len(scores) == 2
    for score in scores:
        assert score.ok and 0.0 <= score.value <= 1.0
        assert 0.0 < score.details["p_yes"] < 1.0 and 0.0 < score.details["p_no"] < 1.0
        assert score.value == pytest.approx(
            score.details["p_yes"] / (score.details["p_yes"] + score.details["p_no"])
        )
        assert score.usage.calls == 1
    again = asyncio.run(verifier.score(images[:1], "a photo of a red cat", {}))
    assert again[0].value == pytest.approx(scores[0].value)
    other = asyncio.run(verifier.score(images[:1], "two blue dogs", {}))
    assert other[0].value != pytest.approx(scores[0].value, abs=1e-9)


def test_unloadable_model_is_one_clear_error(tmp_path):
    with pytest.raises(SetupError, match="verifier.model_path"):
        VLMVerifier(str(tmp_path / "nothing-here"))
