"""A corrector LoRA carries its sampling settings (`reflectionflow.json`): read by the pipeline and the search's
generator, conflicting overrides fail in one line, the paper's file-less LoRA gets the paper's settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from helpers.cli import run_in_process
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from reflectionflow.config import ConfigError
from reflectionflow.models.corrector import corrector_forward, latent_ids
from reflectionflow.models.loading import load_flux_pipeline
from reflectionflow.models.lora import (
    ADAPTER_NAME,
    PAPER_TARGET_MODULES,
    add_lora,
    lora_state_dict,
    save_lora,
)
from reflectionflow.models.pipeline import ReflectionFluxPipeline
from reflectionflow.models.settings import PAPER_SETTINGS, SETTINGS_FILE, CorrectorSettings, read, resolve
from reflectionflow.search.generator import FluxGenerator, GenerationRequest

PROMPT = "a photo of a red bench"


def random_lora(transformer, rank: int = 4) -> None:
    torch.manual_seed(0)
    add_lora(transformer, rank=rank)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


@pytest.fixture(scope="module")
def aligned_lora(tiny_flux_path, tmp_path_factory):
    """A LoRA trained (here: saved) with the condition on the target's positions, 32 px conditions, LoRA on
    target tokens and 24 T5 tokens: none of the paper's settings."""
    flux = FluxPipeline.from_pretrained(tiny_flux_path)
    random_lora(flux.transformer)
    settings = CorrectorSettings(str(tiny_flux_path), rank=4, condition_size=32, condition_position="aligned",
                                 lora_on_target=True, max_sequence_length=24)
    return save_lora(flux.transformer, tmp_path_factory.mktemp("lora") / "aligned", settings), flux


def test_save_lora_writes_the_settings_and_read_returns_them(aligned_lora):
    path, _ = aligned_lora
    data = json.loads((path / SETTINGS_FILE).read_text())
    assert data["condition_position"] == "aligned" and data["rank"] == 4 and data["max_sequence_length"] == 24
    assert read(path) == CorrectorSettings(**data)
    assert read(path / "pytorch_lora_weights.safetensors") == read(path)  # a weights file: its directory's


def test_an_aligned_lora_is_sampled_aligned_without_saying_so(aligned_lora, tiny_flux_path):
    path, flux = aligned_lora
    generator = FluxGenerator(str(tiny_flux_path), str(path), height=64, width=64, num_inference_steps=2,
                              max_sequence_length=16)
    pipe = generator.pipeline
    assert (pipe.condition_position, pipe.condition_size, pipe.lora_on_target) == ("aligned", 32, True)
    assert (pipe.max_sequence_length, pipe.corrector_max_sequence_length) == (16, 24)

    flawed = Image.new("RGB", (64, 64), (200, 30, 30))
    request = GenerationRequest(PROMPT, PROMPT, seed=1, condition=flawed, reflection="make it blue")
    [result] = generator.generate([request])
    kwargs = dict(noises=pipe.initial_noise(1, 64, 64)[None], height=64, width=64, conditions=[flawed],
                  reflections=["make it blue"], num_inference_steps=2, output_type="np")
    explicit = ReflectionFluxPipeline(flux, condition_size=32, condition_position="aligned", lora_on_target=True,
                                      max_sequence_length=16, corrector_max_sequence_length=24)
    beside = ReflectionFluxPipeline(flux, condition_size=32, condition_position="beside", lora_on_target=True,
                                    max_sequence_length=16, corrector_max_sequence_length=24)
    expected = explicit.generate([PROMPT], **kwargs)[0]
    ours = np.asarray(result.image, dtype=np.float64) / 255
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(beside.generate([PROMPT], **kwargs)[0] - expected).max() > 1e-3  # placement matters

    again = ReflectionFluxPipeline.from_pretrained(str(tiny_flux_path), str(path))  # the pipeline reads it too
    assert (again.condition_position, again.condition_size, again.corrector_max_sequence_length) == ("aligned", 32, 24)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"condition_position": "beside"}, "generator.condition_position='beside'"),
        ({"condition_size": 1024}, "generator.condition_size=1024"),
        ({"attention": "causal"}, "generator.attention='causal'"),
        ({"corrector_max_sequence_length": 512}, "generator.corrector_max_sequence_length=512"),
    ],
)
def test_a_conflicting_override_fails_in_one_line_before_loading(aligned_lora, tmp_path, override, key):
    path, _ = aligned_lora
    with pytest.raises(ConfigError) as err:
        FluxGenerator(str(tmp_path / "no-model-here"), str(path), **override)
    message = str(err.value)
    assert message.startswith(key) and "contradicts the corrector LoRA" in message and "\n" not in message
    assert resolve(path, {"condition_position": "aligned"}).condition_position == "aligned"


def test_the_infer_app_reports_a_conflict_as_one_error_line(aligned_lora, tiny_flux_path, tmp_path, capfd):
    path, _ = aligned_lora
    done = run_in_process(
        "infer", "progress=false", "generator=flux_tiny", f"weights.path={tiny_flux_path}",
        f"weights.lora_path={path}", "generator.condition_position=beside", "verifier=deterministic",
        "reflector=deterministic", "refiner=deterministic", "search.width=1", "search.depth=1",
        "prompt=a red cube", f"hydra.run.dir={tmp_path / 'run'}", capture=capfd,
    )
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: generator: generator.condition_position='beside' contradicts the corrector LoRA")
    assert not list((tmp_path / "run").glob("0*"))


@pytest.fixture(scope="module")
def paper_lora(tiny_flux_path, tmp_path_factory):
    """A LoRA written the way the paper's trainer writes it (`train_flux/train/model.py`): peft's default
    adapter on the paper's targets, `FluxPipeline.save_lora_weights(transformer_lora_layers=
    get_peft_model_state_dict(transformer))`, bf16 weights, no adapter metadata, no settings file."""
    flux = FluxPipeline.from_pretrained(tiny_flux_path, torch_dtype=torch.bfloat16)
    transformer = flux.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=PAPER_TARGET_MODULES))
    generator = torch.Generator().manual_seed(0)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator).mul(0.1).to(p.dtype)
    directory = tmp_path_factory.mktemp("paper") / "FLUX-Corrector"
    FluxPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   safe_serialization=True)
    return directory, {k: v.clone() for k, v in get_peft_model_state_dict(transformer).items()}


def test_a_lora_written_by_the_papers_trainer_loads_and_matches(paper_lora, tiny_flux_path):
    directory, saved = paper_lora
    assert sorted(p.name for p in directory.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert read(directory) is None and resolve(directory, {}) == PAPER_SETTINGS
    pipe = ReflectionFluxPipeline.from_pretrained(str(tiny_flux_path), str(directory))
    assert (pipe.condition_position, pipe.condition_size, pipe.attention, pipe.lora_on_target) == (
        "beside", 512, "union", False)
    assert pipe.corrector_max_sequence_length == 512
    loaded = lora_state_dict(pipe.transformer, ADAPTER_NAME)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k].float()) for k in saved)  # bf16 values, exactly

    reference = FluxPipeline.from_pretrained(tiny_flux_path).transformer  # the same adapter, built in memory
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=PAPER_TARGET_MODULES))
    set_peft_model_state_dict(reference, {k: v.float() for k, v in saved.items()})
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=latent_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]),
        cond_hidden_states=torch.randn(1, 4, 64, generator=g), cond_ids=latent_ids(4, 4),
    )
    with torch.no_grad():
        assert torch.equal(corrector_forward(pipe.transformer, **inputs), corrector_forward(reference, **inputs))


def test_a_hub_id_lora_loads_offline_with_its_weight_name(paper_lora, aligned_lora, tiny_flux_path, tmp_path,
                                                          monkeypatch):
    """diffusers cannot guess a hub LoRA's file name offline; the configured weight name loads it, and the
    settings file is looked up in the same repository."""
    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someone--FLUX-Corrector"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(
        (paper_lora[0] / "pytorch_lora_weights.safetensors").read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = load_flux_pipeline(tiny_flux_path, lora_path="someone/FLUX-Corrector", adapter_name=ADAPTER_NAME)
    assert torch.equal(lora_state_dict(pipe.transformer, ADAPTER_NAME)["x_embedder.lora_B.weight"],
                       paper_lora[1]["x_embedder.lora_B.weight"].float())
    (snapshot / SETTINGS_FILE).write_text((aligned_lora[0] / SETTINGS_FILE).read_text())
    assert read("someone/FLUX-Corrector").condition_position == "aligned"


def test_bad_settings_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="condition_position"):
        CorrectorSettings(condition_position="above")
    (tmp_path / SETTINGS_FILE).write_text('{"condition_size": "big"}')
    with pytest.raises(ConfigError, match="not a valid corrector settings file"):
        read(tmp_path)
