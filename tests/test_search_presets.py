"""The paper-faithful verifier, reflector and refiner presets send exactly the paper's messages (captured by a
loopback OpenAI-compatible server), and our default reflector passes the image's own prompt and reflection."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from helpers.chat_server import ScriptedChatServer
from hydra.utils import instantiate
from PIL import Image

from reflectionflow.search.instructions import NO_CHANGE, paper_verifier_system
from reflectionflow.search.prompts import geneval_prompts
from reflectionflow.search.reflectors import OpenAIPromptRefiner, OpenAIReflector
from reflectionflow.search.verifiers import PaperRubricVerifier, Score

KEY_ENV = "RF_TEST_API_KEY"
IMAGE = Image.new("RGB", (16, 16), (200, 40, 40))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def backend(compose_config, role: str, preset: str, server: ScriptedChatServer):
    cfg = compose_config("infer", f"{role}={preset}", f"{role}.chat.base_url={server.base_url}",
                         f"{role}.chat.api_key_env={KEY_ENV}", f"{role}.chat.timeout=5")
    return instantiate(cfg[role], _convert_="all"), cfg[role]


def the_image(part: dict) -> Image.Image:
    assert part["type"] == "image_url"
    data = part["image_url"]["url"].removeprefix("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def two_object_answer(body: dict) -> str:
    rating = lambda score: {"score": score, "explanation": "seen"}  # noqa: E731
    return json.dumps({"separation_clarity": rating(9), "individual_completeness": rating(7),
                       "relationship_accuracy": rating(3), "overall_score": rating(6)})


def test_openai_paper_verifier_sends_the_tag_rubric_and_ranks_by_overall_score(compose_config):
    item = next(i for i in geneval_prompts() if i.record["tag"] == "two_object")
    with ScriptedChatServer(responders={"gpt-4o-2024-11-20": two_object_answer}) as server:
        verifier, _ = backend(compose_config, "verifier", "openai_paper", server)
        assert isinstance(verifier, PaperRubricVerifier)
        [score] = asyncio.run(verifier.score([IMAGE], item.prompt, item.record))
        [request] = server.requests
    body = request.body
    assert body["model"] == "gpt-4o-2024-11-20" and body["temperature"] == 1.0 and "max_tokens" not in body
    system, user = body["messages"]
    assert system == {"role": "system", "content": paper_verifier_system("two_object")}
    for aspect in ("separation_clarity", "individual_completeness", "relationship_accuracy", "overall_score"):
        assert f"`{aspect}`" in system["content"]
    assert user["role"] == "user" and user["content"][0] == {"type": "text", "text": item.prompt}  # bare prompt
    assert the_image(user["content"][1]).tobytes() == IMAGE.tobytes() and len(user["content"]) == 2
    schema = body["response_format"]["json_schema"]
    assert schema["name"] == "grading_two_object" and schema["strict"] is True
    assert schema["schema"]["required"] == ["separation_clarity", "individual_completeness",
                                            "relationship_accuracy", "overall_score"]
    assert list(schema["schema"]["properties"]["overall_score"]["properties"]) == ["score", "explanation"]
    assert score.ok and score.value == 0.6  # overall_score / 10, not the mean of the aspects
    assert score.details["aspects"]["relationship_accuracy"] == {"score": 3, "explanation": "seen"}


def test_reflection_generator_replays_the_format_its_model_was_trained_on(compose_config):
    with ScriptedChatServer() as server:
        reflector, _ = backend(compose_config, "reflector", "reflection_generator", server)
        evaluation = Score(0.4, {"aspects": {"overall_score": {"score": 4, "explanation": "no dog"}}})
        answer = asyncio.run(reflector.reflect(IMAGE, "a photo of a dog", evaluation, {},
                                               image_prompt="a photo of a dog, detailed", image_reflection="Add fur."))
        [request] = server.requests
    assert answer.ok and answer.text
    body = request.body
    assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and "temperature" not in body and "max_tokens" not in body
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a helpful assistant."}
    image, text = user["content"]
    assert the_image(image).tobytes() == IMAGE.tobytes()  # the image first
    assert text == {"type": "text", "text": 'Generate reflections to improve the input image according to the '
                                            'prompt. The prompt is: "a photo of a dog"'}
    assert "no dog" not in json.dumps(body) and "Add fur" not in json.dumps(body)  # no evaluation, no history


def test_our_reflector_passes_the_prompt_and_reflection_that_made_the_image(compose_config):
    with ScriptedChatServer() as server:
        reflector, _ = backend(compose_config, "reflector", "openai", server)
        evaluation = Score(0.4, {"aspects": {"count": {"score": 4, "explanation": "one dog, not two"}}})
        asyncio.run(reflector.reflect(IMAGE, "two dogs", evaluation, {}, image_prompt="two brown dogs on grass",
                                      image_reflection="Add a second dog."))
        asyncio.run(reflector.reflect(IMAGE, "two dogs", evaluation, {}))  # a base-model image
        corrected, base = (r.body for r in server.requests)
    system, user = corrected["messages"]
    assert "the prompt and reflection the image was made from" in system["content"]
    text, image = user["content"]
    assert text["text"] == ('Prompt: "two dogs"\nThe image was generated from: "two brown dogs on grass"\n'
                            "Reflection it was corrected with: Add a second dog.\nEvaluation of the image:\n"
                            "- count: 4/10. one dog, not two\nWrite the reflection.")
    assert the_image(image).tobytes() == IMAGE.tobytes()
    assert 'generated from: "two dogs"\nReflection it was corrected with: (none)' in base["messages"][1]["content"][0]["text"]


def test_an_explicit_no_change_answer_is_accepted_at_once(compose_config):
    with ScriptedChatServer(responders={"gpt-4o": lambda body: "no change needed"}) as server:
        reflector, _ = backend(compose_config, "reflector", "openai", server)
        answer = asyncio.run(reflector.reflect(IMAGE, "a red cube", Score(1.0), {}))
        attempts = server.count()
    assert answer.ok and answer.text == NO_CHANGE and attempts == 1 and answer.usage.retries == 0


def test_openai_paper_refiner_sends_every_input_as_its_own_part(compose_config):
    long_answer = "A vivid photo of two brown dogs on a sunny lawn,\nshallow depth of field."
    with ScriptedChatServer(responders={"gpt-4o-2024-11-20": lambda body: long_answer}) as server:
        refiner, _ = backend(compose_config, "refiner", "openai_paper", server)
        assert isinstance(refiner, OpenAIPromptRefiner)
        evaluation = Score(0.3, {"aspects": {"count_accuracy": {"score": 3, "explanation": "one dog"}}})
        answer = asyncio.run(refiner.refine(IMAGE, "two dogs, outdoors", evaluation, "Add a second dog.",
                                            goal="two dogs", meta={}))
        [request] = server.requests
    body = request.body
    assert body["temperature"] == 1.0 and body["model"] == "gpt-4o-2024-11-20"
    system, user = body["messages"]
    assert "scene" in system["content"] and "contradict the reflection" in system["content"]
    texts = [part.get("text") for part in user["content"]]
    assert texts == [
        "Original prompt: two dogs",
        "Current prompt: two dogs, outdoors",
        "Reflection prompt: Add a second dog.",
        None,
        'Evaluation of the generated images: {"count_accuracy": {"score": 3, "explanation": "one dog"}}',
        "Please refine the current prompt to improve the overall quality of the future generated images.",
    ]
    assert the_image(user["content"][3]).tobytes() == IMAGE.tobytes()
    assert answer.text == long_answer  # taken whole, not its first line


def test_bad_templates_fail_with_one_line():
    from reflectionflow.search.chat import OpenAIChat

    chat = OpenAIChat(api_key_env=None)
    with pytest.raises(ValueError, match="unknown placeholder {goal}"):
        OpenAIReflector(chat, content=["<image>", "{goal}"])
    with pytest.raises(ValueError, match="exactly once"):
        OpenAIReflector(chat, content=["{prompt}"])
    with pytest.raises(ValueError, match="refiner.answer='all'"):
        OpenAIPromptRefiner(chat, answer="all")
