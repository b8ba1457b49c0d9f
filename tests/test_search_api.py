"""API backends through the real `openai` client against a loopback server with scripted faults."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers.chat_server import HTML_PAGE, ScriptedChatServer, default_responder
from PIL import Image

from reflectionflow.search.chat import OpenAIChat
from reflectionflow.search.config import Axes, SearchConfig, planned_cost
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.errors import FatalAPIError, MissingAPIKeyError
from reflectionflow.search.generator import DeterministicGenerator
from reflectionflow.search.instructions import aspects_for
from reflectionflow.search.prompts import PromptItem, geneval_prompts
from reflectionflow.search.reflectors import OpenAIPromptRefiner, OpenAIReflector, parse_prompt
from reflectionflow.search.runner import run_search
from reflectionflow.search.verifiers import OpenAIVerifier, parse_ratings

KEY_ENV = "RF_TEST_API_KEY"
KEY = "sk-test-0123456789-distinctive"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def chat(server: ScriptedChatServer, model: str, **kwargs) -> OpenAIChat:
    options = dict(api_key_env=KEY_ENV, max_retries=3, parse_retries=1, timeout=0.5, max_concurrency=4)
    return OpenAIChat(model=model, base_url=server.base_url, **(options | kwargs))


def engine_for(server: ScriptedChatServer, config: SearchConfig, **chat_kwargs) -> SearchEngine:
    return SearchEngine(
        DeterministicGenerator(size=16, num_inference_steps=5, micro_batch=2),
        OpenAIVerifier(chat(server, "verifier", **chat_kwargs)),
        config,
        OpenAIReflector(chat(server, "reflector", **chat_kwargs)),
        OpenAIPromptRefiner(chat(server, "refiner", **chat_kwargs)),
    )


def broken_verifier(body: dict) -> str:
    """Schema-valid ratings, except for prompts mentioning 'broken', which always get prose."""
    if "broken" in json.dumps(body["messages"]):
        return "I think the image is quite nice overall."
    return default_responder(body)


def reflector(body: dict) -> str:
    return "" if "broken" in json.dumps(body["messages"]) else "Change the cat's colour to red."


def refiner(body: dict) -> str:
    return 'New prompt: "a photo of a bright red cat, centred"'


def test_search_survives_faults_and_accounts_every_call(tmp_path):
    faults = ["429", "500", "malformed_content", "malformed_body", "timeout", None, "500", "429"]
    items = [
        PromptItem(0, "a photo of a red cat", {"tag": "colors", "prompt": "a photo of a red cat"}),
        PromptItem(1, "a broken photo of a dog", {"prompt": "a broken photo of a dog"}),
    ]
    config = SearchConfig(width=2, depth=2, axes=Axes(noise=True, prompt=True, reflection=True))
    responders = {"verifier": broken_verifier, "reflector": reflector, "refiner": refiner}
    with ScriptedChatServer(responders=responders, faults=faults, timeout_sleep=1.0) as server:
        summary = run_search(engine_for(server, config), items, tmp_path, progress=False)
        requests = list(server.requests)
    assert not server.faults, "every scripted fault was served"
    assert all(r.authorization == f"Bearer {KEY}" for r in requests)

    budget = summary["budget"]
    plan = planned_cost(config)
    assert budget["images"] == 2 * plan["images"]
    assert budget["verifier"]["calls"] == 2 * plan["verifier_calls"]
    assert budget["reflector"]["calls"] == 2 * plan["reflector_calls"]
    assert budget["refiner"]["calls"] == 2 * plan["refiner_calls"]
    for role in ("verifier", "reflector", "refiner"):  # every HTTP request the server saw is accounted
        assert budget[role]["attempts"] == sum(1 for r in requests if r.body["model"] == role)
        assert budget[role]["attempts"] == budget[role]["calls"] + budget[role]["retries"]
    always_retried = sum(f in ("429", "500", "timeout", "malformed_body") for f in faults)
    assert sum(budget[role]["retries"] for role in ("verifier", "reflector", "refiner")) >= always_retried
    assert budget["verifier"]["tokens_in"] > 0 and budget["verifier"]["tokens_out"] > 0

    good = json.loads((tmp_path / "00000" / "search.json").read_text())
    assert all(c["score"]["ok"] for c in good["candidates"])
    assert set(good["candidates"][0]["score"]["details"]["aspects"]) == {
        "object_presence",
        "color",
        "overall",
    }
    later = [c for c in good["candidates"] if c["round"] > 0]
    assert all(c["reflection"] == "Change the cat's colour to red." for c in later)
    assert all(c["prompt"] == "a photo of a bright red cat, centred" for c in later)

    bad = json.loads((tmp_path / "00001" / "search.json").read_text())
    assert bad["score_ok"] is False
    for candidate in bad["candidates"]:  # raw failed answers kept, the search went on
        assert candidate["score"]["ok"] is False
        assert candidate["score"]["raw"] == "I think the image is quite nice overall."
        assert "malformed answer" in candidate["score"]["error"]
        if candidate["round"] > 0:
            assert candidate["reflection"] is None
            assert [f["stage"] for f in candidate["failures"]] == ["reflect"]
    assert budget["verifier"]["failures"] == plan["verifier_calls"]  # all of prompt 1's, none of prompt 0's
    assert budget["reflector"]["failures"] == plan["reflector_calls"]
    assert summary["failed_selections"] == 1


def test_exhausted_retries_become_a_failed_score_with_the_error():
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    with ScriptedChatServer(faults=["500"] * 3) as server:
        verifier = OpenAIVerifier(chat(server, "verifier", max_retries=2))
        [score] = asyncio.run(verifier.score([image], "a red square", {}))
    assert not score.ok and "500" in score.error and "server exploded" in score.raw
    assert (score.usage.attempts, score.usage.retries, score.usage.failures) == (3, 2, 1)


def test_html_page_served_with_200_is_asked_again_then_a_failed_call_and_the_run_goes_on(tmp_path):
    """A proxy's 502 page with status 200 made the client hand back a str, which ended the run."""
    config = SearchConfig(width=2, depth=1, axes=Axes(noise=True, prompt=True, reflection=True))
    with ScriptedChatServer(faults=["html_page"] * 3) as server:  # the first call gets 2 pages, the next 1
        engine = engine_for(server, config, max_concurrency=1)
        summary = run_search(engine, geneval_prompts()[:1], tmp_path, progress=False)
        requests = len(server.requests)
    budget = summary["budget"]
    assert sum(budget[role]["attempts"] for role in ("verifier", "reflector", "refiner")) == requests
    assert sum(budget[role]["retries"] for role in ("verifier", "reflector", "refiner")) == 2
    assert (
        budget["verifier"]["failures"] == 1
        and budget["reflector"]["failures"] == budget["refiner"]["failures"] == 0
    )
    search = json.loads((tmp_path / "00000" / "search.json").read_text())
    failed = [c["score"] for c in search["candidates"] if not c["score"]["ok"]]
    assert len(failed) == 1 and failed[0]["raw"] == HTML_PAGE.decode()
    assert failed[0]["error"].startswith(
        "undecodable response body: not a chat completion (content type text/html"
    )
    assert len(search["candidates"]) == 4 and sum(c["score"]["ok"] for c in search["candidates"]) == 3


def test_huge_answers_are_cut_to_max_answer_chars_and_counted(tmp_path):
    """A 5 MB reflection used to be kept whole and fed on to the refiner and the corrector."""
    config = SearchConfig(width=2, depth=1, axes=Axes(noise=True, prompt=True, reflection=True))
    huge = "Make the cat red. " * 300_000  # 5.4 MB
    responders = {"reflector": lambda body: huge, "refiner": refiner}
    with ScriptedChatServer(responders=responders) as server:
        summary = run_search(
            engine_for(server, config, max_answer_chars=500), geneval_prompts()[:1], tmp_path, progress=False
        )
        refiner_requests = [r.body for r in server.requests if r.body["model"] == "refiner"]
    budget = summary["budget"]
    assert budget["reflector"]["truncated"] == budget["reflector"]["calls"] == 2
    assert budget["verifier"]["truncated"] == budget["refiner"]["truncated"] == 0
    search = json.loads((tmp_path / "00000" / "search.json").read_text())
    later = [c for c in search["candidates"] if c["round"] == 1]
    assert all(c["reflection"] == huge[:500].strip() for c in later)
    assert len(refiner_requests) == 2 and all(len(json.dumps(body)) < 10_000 for body in refiner_requests)
    assert (tmp_path / "00000" / "search.json").stat().st_size < 50_000


def test_rejected_key_is_fatal():
    with ScriptedChatServer(faults=["401"]) as server:
        verifier = OpenAIVerifier(chat(server, "verifier"))
        with pytest.raises(FatalAPIError, match="AuthenticationError") as err:
            asyncio.run(verifier.score([Image.new("RGB", (8, 8))], "a cat", {}))
    assert KEY not in str(err.value)


def test_calls_run_concurrently_within_the_bound(tmp_path):
    config = SearchConfig(width=6, depth=1, axes=Axes(noise=True, reflection=True))
    with ScriptedChatServer(latency=0.2) as server:
        engine = engine_for(server, config, max_concurrency=3)
        engine.generator.micro_batch = 6
        run_search(engine, geneval_prompts()[:1], tmp_path, progress=False)
    assert server.peak_in_flight["verifier"] == 3
    assert 2 <= server.peak_in_flight["reflector"] <= 3


def test_missing_key_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MissingAPIKeyError, match=f"{KEY_ENV} is not set"):
        OpenAIChat(api_key_env=KEY_ENV)
    assert "EMPTY" not in repr(OpenAIChat(api_key_env=None))


def test_the_key_never_shows_in_repr_or_returned_text():
    with ScriptedChatServer(responders={"verifier": lambda body: f"leak {KEY}"}) as server:
        client = chat(server, "verifier", parse_retries=0)
        [score] = asyncio.run(OpenAIVerifier(client).score([Image.new("RGB", (8, 8))], "a cat", {}))
    assert KEY not in repr(client) and KEY not in score.raw and "<redacted>" in score.raw


def test_structured_request_asks_for_the_tag_aspects():
    with ScriptedChatServer() as server:
        verifier = OpenAIVerifier(chat(server, "verifier"))
        meta = geneval_prompts()[500]
        [score] = asyncio.run(verifier.score([Image.new("RGB", (8, 8))], meta.prompt, meta.record))
        body = server.requests[0].body
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == list(aspects_for(meta.record))
    assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert score.ok and 0 <= score.value <= 1


def test_parsers():
    aspects = ("count", "overall")
    good = '```json\n{"count": {"explanation": "two", "score": 8}, "overall": {"explanation": "", "score": 6}}\n```'
    assert parse_ratings(good, aspects)["count"]["score"] == 8
    for bad in (
        "[1, 2]",
        '{"count": {"score": 11}, "overall": {"score": 1}}',
        '{"count": {"score": true}}',
        "{",
    ):
        with pytest.raises(ValueError):
            parse_ratings(bad, aspects)
    assert parse_prompt('\n Refined prompt: "two red apples"\nbecause...') == "two red apples"
    with pytest.raises(ValueError):
        parse_prompt("  \n ''")
