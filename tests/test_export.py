"""`python -m reflectionflow.export push`: a trained LoRA with its model card onto a loopback fake hub."""

from __future__ import annotations

import json
import os
import shutil
from unittest import mock

import pytest
from conftest import compose_app
from helpers.cli import main_in_process, run_in_process
from helpers.fake_hub import FakeHub
from huggingface_hub import ModelCard
from omegaconf import OmegaConf

from reflectionflow.export import model_card

TOKEN = "hf_export_test_7d1f0c2a-never-in-a-card"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step tiny training run: its directory holds lora/final, validation/ and .hydra/config.yaml."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    with mock.patch.dict(os.environ, {"REFLECTIONFLOW_CACHE": str(root / "cache")}):
        message = main_in_process(
            "train",
            "experiment=tiny",
            "trainer.max_steps=2",
            "model.lora_rank=4",
            "validation.num_inference_steps=2",
            f"hydra.run.dir={run}",
        )
    assert message is None
    return run


def test_push_uploads_the_lora_with_a_model_card_and_the_validation_sheet(trained_run, monkeypatch, capfd):
    lora = trained_run / "lora" / "final"
    with FakeHub() as hub:
        hub.use_in_process(monkeypatch)
        done = run_in_process(
            "export",
            "push",
            str(lora),
            "--repo",
            "org/corrector",
            capture=capfd,
            env=hub.environment() | {"HF_TOKEN": TOKEN},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "pushed" in done.stdout and "org/corrector" in done.stdout
        assert TOKEN not in done.stdout + done.stderr
        files = hub.repos["models/org/corrector"]
        assert [c["name"] for c in hub.created] == ["corrector"] and hub.created[0]["organization"] == "org"
        writes = [
            r for r in hub.requests if r.method == "POST"
        ]  # create, validate the card, preupload, commit
        assert len(writes) >= 3 and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    assert set(files) == {
        "pytorch_lora_weights.safetensors",
        "reflectionflow.json",
        "README.md",
        "images/validation.png",
    }
    assert (
        files["pytorch_lora_weights.safetensors"] == (lora / "pytorch_lora_weights.safetensors").read_bytes()
    )
    assert files["images/validation.png"] == (trained_run / "validation" / "step-0000002.png").read_bytes()
    readme = files["README.md"].decode()
    assert TOKEN not in readme
    card = ModelCard(readme)
    assert card.data.library_name == "diffusers" and {"lora", "flux", "reflectionflow"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny model is not on the hub
    settings = json.loads((lora / "reflectionflow.json").read_text())
    assert json.dumps(settings, indent=2) in card.text  # the settings the LoRA samples with
    assert "- steps: `2`" in card.text and "- LoRA rank: `4`" in card.text
    assert "![validation](images/validation.png)" in card.text and "step 2" in card.text


def test_push_without_hf_token_fails_in_one_line(trained_run, monkeypatch, capfd):
    with FakeHub() as hub:
        hub.use_in_process(monkeypatch)
        done = run_in_process(
            "export",
            "push",
            str(trained_run / "lora" / "final"),
            "--repo",
            "org/corrector",
            capture=capfd,
            env=hub.environment() | {"HF_TOKEN": ""},
        )
        assert not hub.requests
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: HF_TOKEN is not set: pushing to the hub needs a write token (export HF_TOKEN=hf_...)"
    ]


def test_card_of_a_genref_run_names_base_model_dataset_and_licence(trained_run, tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_app("train", "experiment=genref"), run / ".hydra" / "config.yaml")
    shutil.copytree(trained_run / "lora" / "final", run / "lora" / "final")
    card = ModelCard(model_card(run / "lora" / "final", "org/corrector", run))
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev"
    assert card.data.datasets == ["diffusion-cot/GenRef-wds"]
    assert card.data.license == "other" and card.data.license_name == "flux-1-dev-non-commercial-license"
    assert "`hf://datasets/diffusion-cot/GenRef-wds/genref_{0..207}.tar`" in card.text
    assert (
        "- LoRA rank: `256`" in card.text
        and "- drops (text / image / reflection): `0.1 / 0.1 / 0.2`" in card.text
    )
    assert "## Validation" not in card.text  # this run directory has no validation sheets
