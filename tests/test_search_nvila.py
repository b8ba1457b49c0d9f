"""`verifier=nvila` against tiny fake remote-code models written here: loading with trust_remote_code, the
paper's `generate_content([image, prompt])` call and its yes-then-no ranking, and one clear line when the
installed transformers cannot load the model's code."""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest
from hydra.utils import instantiate
from PIL import Image

from reflectionflow.search.errors import SetupError
from reflectionflow.search.nvila import RemoteCodeYesNoVerifier, yes_no_value

MODELING = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel


class FakeYesNoConfig(PretrainedConfig):
    model_type = "fake_yes_no"


class WordTokenizer:
    VOCAB = ["<pad>", "yes", "no", "maybe"]

    def encode(self, text, add_special_tokens=True):
        return [self.VOCAB.index(text)]


class FakeYesNoModel(PreTrainedModel):
    """Says "yes" to bright images; the first token's scores are a function of brightness and prompt."""

    config_class = FakeYesNoConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.tensor([4.0]))
        self.tokenizer = WordTokenizer()
        self.calls = []
        self.post_init()

    def generate_content(self, inputs):
        image, prompt = inputs
        self.calls.append((image.size, prompt))
        brightness = torch.tensor(image.convert("L").getdata(), dtype=torch.float32).mean() / 255
        logits = torch.zeros(1, 4)
        logits[0, 1] = self.scale[0] * (brightness - 0.5) + len(prompt) / 100
        logits[0, 2] = -logits[0, 1]
        return ("yes" if logits[0, 1] > logits[0, 2] else "no"), (logits,)
'''


def write_remote_code_model(path, modeling: str = MODELING):
    path.mkdir(parents=True)
    (path / "modeling_fake.py").write_text(textwrap.dedent(modeling))
    auto_map = {"AutoConfig": "modeling_fake.FakeYesNoConfig", "AutoModel": "modeling_fake.FakeYesNoModel"}
    (path / "config.json").write_text(json.dumps({"model_type": "fake_yes_no", "auto_map": auto_map}))
    import torch
    from safetensors.torch import save_file

    save_file({"scale": torch.tensor([4.0])}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def fake_verifier_path(tmp_path_factory):
    return write_remote_code_model(tmp_path_factory.mktemp("nvila") / "fake-yes-no")


def shade(level: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (level, level, level))


def test_remote_code_verifier_calls_generate_content_and_ranks_like_the_paper(fake_verifier_path):
    verifier = RemoteCodeYesNoVerifier(str(fake_verifier_path), trust_remote_code=True)
    images = [shade(v) for v in (30, 250, 140, 90, 200)]
    scores = asyncio.run(verifier.score(images, "a photo of a cat", {"tag": "single_object"}))
    assert verifier.model.calls == [((16, 16), "a photo of a cat")] * 5
    labels = [s.details["label"] for s in scores]
    assert labels == ["no", "yes", "yes", "no", "yes"]
    # the paper's sort: yes first by descending yes score, then no by ascending no score
    paper = sorted(range(5), key=lambda i: (0, -scores[i].details["score"]) if labels[i] == "yes"
                   else (1, scores[i].details["score"]))
    ours = sorted(range(5), key=lambda i: scores[i].rank, reverse=True)
    assert ours == paper == [1, 4, 2, 3, 0]
    assert all((s.value > 0.5) == (s.details["label"] == "yes") and s.usage.calls == 1 for s in scores)


def test_yes_no_value_keeps_the_order_at_extreme_scores():
    assert yes_no_value("yes", 30.0) > yes_no_value("yes", 3.0) > yes_no_value("yes", -800.0) > 0.5
    assert 0.5 > yes_no_value("no", -800.0) > yes_no_value("no", 3.0) > yes_no_value("no", 800.0) >= 0.0


def test_remote_code_needs_an_explicit_trust_flag(fake_verifier_path):
    with pytest.raises(SetupError, match="verifier.trust_remote_code=true"):
        RemoteCodeYesNoVerifier(str(fake_verifier_path))


def test_code_the_installed_transformers_cannot_run_is_one_clear_line(tmp_path):
    broken = MODELING.replace("import torch\n", "import torch\nimport s2wrapper_not_installed_here\n", 1)
    path = write_remote_code_model(tmp_path / "needs-other-packages", broken)
    with pytest.raises(SetupError) as err:
        RemoteCodeYesNoVerifier(str(path), trust_remote_code=True)
    message = str(err.value)
    assert "\n" not in message and "cannot load the remote-code model" in message
    assert "transformers 4.46" in message and "docs/search.md" in message
    with pytest.raises(SetupError, match="verifier.model_path"):
        RemoteCodeYesNoVerifier(str(tmp_path / "nothing-here"), trust_remote_code=True)


def test_nvila_preset_composes(compose_config, fake_verifier_path):
    cfg = compose_config("infer", "verifier=nvila", f"verifier.model_path={fake_verifier_path}",
                         "verifier.trust_remote_code=true", "verifier.model_kwargs={}")
    verifier = instantiate(cfg.verifier, _convert_="all")
    assert isinstance(verifier, RemoteCodeYesNoVerifier)
    assert compose_config("infer", "verifier=nvila").verifier.trust_remote_code is False
