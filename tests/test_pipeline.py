"""Tiny FLUX build/load/generate, LoRA files, model loading errors and the ReflectionFluxPipeline."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from reflectionflow.models.corrector import corrector_forward, latent_ids
from reflectionflow.models.loading import ModelNotFoundError, load_flux_pipeline
from reflectionflow.models.lora import ADAPTER_NAME, add_lora, lora_state_dict, save_lora
from reflectionflow.models.pipeline import ReflectionFluxPipeline, combine_guidance, guidance_branches
from reflectionflow.models.settings import CorrectorSettings
from reflectionflow.models.tiny import build_tiny_flux

PROMPT = "a photo of a red bench"


@pytest.fixture()
def flux(tiny_flux_path):
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_flux_is_small_deterministic_and_loads(tmp_path, tiny_flux_path):
    size = sum(f.stat().st_size for f in tiny_flux_path.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    again = build_tiny_flux(tmp_path / "again", seed=0)
    for weights in tiny_flux_path.rglob("*.safetensors"):
        a, b = load_file(weights), load_file(again / weights.relative_to(tiny_flux_path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for folder in ("tokenizer", "tokenizer_2"):  # the same text maps to the same ids in every build
        for file in (tiny_flux_path / folder).iterdir():
            assert file.read_bytes() == (again / folder / file.name).read_bytes(), file
    pipe = load_flux_pipeline(tiny_flux_path)
    config = pipe.transformer.config
    assert config.guidance_embeds and config.in_channels == 64
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=32).images[0]
    assert image.size == (64, 64)


def test_missing_model_fails_with_one_clear_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model\.path=") as err:
        load_flux_pipeline(tmp_path / "nowhere")
    assert "\n" not in str(err.value) and "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_flux_pipeline(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="black-forest-labs/FLUX.1-dev"):
        load_flux_pipeline("black-forest-labs/FLUX.1-dev")  # no hub here: fails before any weights load


def _random_lora(transformer, rank, alpha):
    torch.manual_seed(0)
    add_lora(transformer, rank=rank, alpha=alpha)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 16)])
def test_lora_round_trip_is_bit_exact_and_scaled_right(tmp_path, tiny_flux_path, flux, rank, alpha):
    _random_lora(flux.transformer, rank, alpha)
    save_lora(flux.transformer, tmp_path / "lora", CorrectorSettings(rank=rank))
    reloaded = load_flux_pipeline(tiny_flux_path, lora_path=tmp_path / "lora")
    saved = lora_state_dict(flux.transformer)
    loaded = lora_state_dict(reloaded.transformer, ADAPTER_NAME)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert reloaded.transformer.peft_config[ADAPTER_NAME].lora_alpha == alpha

    plain = FluxPipeline.from_pretrained(tiny_flux_path)
    plain.load_lora_weights(tmp_path / "lora")  # a user's plain diffusers pipeline reads the file too
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=latent_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]),
        cond_hidden_states=torch.randn(1, 4, 64, generator=g), cond_ids=latent_ids(4, 4),
    )
    with torch.no_grad():
        expected = corrector_forward(flux.transformer, **inputs)
        assert torch.equal(expected, corrector_forward(reloaded.transformer, **inputs))
        assert torch.equal(expected, corrector_forward(plain.transformer, **inputs))


def test_lora_defaults_to_the_papers_rank_and_targets(flux):
    add_lora(flux.transformer)
    config = flux.transformer.peft_config[ADAPTER_NAME]
    assert config.r == 256
    wrapped = {n.rsplit(".base_layer", 1)[0] for n, _ in flux.transformer.named_modules() if n.endswith("base_layer")}
    assert wrapped == {
        "x_embedder",
        *(f"transformer_blocks.0.{m}" for m in ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")),
        *(f"single_transformer_blocks.{i}.{m}" for i in range(2)
          for m in ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")),
    }


def test_unknown_lora_targets_fail_clearly(flux):
    with pytest.raises(ValueError, match="not found"):
        add_lora(flux.transformer, rank=4, target_modules=["no_such_layer"])


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_text_to_image_matches_diffusers_flux_pipeline(flux, true_cfg_scale):
    """Also with true CFG: the base model's unconditional branch is FluxPipeline's negative_prompt=""."""
    negative = {"negative_prompt": ""} if true_cfg_scale > 1 else {}
    expected = flux(PROMPT, height=64, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                    output_type="np", true_cfg_scale=true_cfg_scale, **negative).images
    ours = ReflectionFluxPipeline(flux)(PROMPT, height=64, width=64, num_inference_steps=4, true_cfg_scale=true_cfg_scale,
                                        generator=torch.Generator().manual_seed(3), output_type="np")
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["union", "causal"])
def test_correction_uses_image_and_reflection(flux, attention):
    _random_lora(flux.transformer, 4, 4)
    pipe = ReflectionFluxPipeline(flux, attention=attention, condition_size=32)
    base = pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(0))[0]
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    a = pipe(PROMPT, image=base, reflection="make it blue", generator=torch.Generator().manual_seed(1), **kwargs)
    b = pipe(PROMPT, image=base.rotate(90), reflection="make it blue", generator=torch.Generator().manual_seed(1), **kwargs)
    c = pipe(PROMPT, image=base, reflection="add a cat", generator=torch.Generator().manual_seed(1), **kwargs)
    assert np.abs(a - b).max() > 1e-4 and np.abs(a - c).max() > 1e-4


def test_reflection_guidance_splits_the_correctors_guidance(flux):
    """Equal scales are plain CFG on prompt + reflection; another reflection scale moves the correction."""
    _random_lora(flux.transformer, 4, 4)
    pipe = ReflectionFluxPipeline(flux, condition_size=32)
    flawed = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))[0]
    kwargs = dict(image=flawed, reflection="make it blue", height=64, width=64, num_inference_steps=2,
                  true_cfg_scale=2.0, output_type="np")
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs)
    equal = pipe(PROMPT, generator=torch.Generator().manual_seed(1), reflection_guidance_scale=2.0, **kwargs)
    split = pipe(PROMPT, generator=torch.Generator().manual_seed(1), reflection_guidance_scale=5.0, **kwargs)
    np.testing.assert_allclose(equal, plain, atol=1e-5)
    assert np.abs(split - plain).max() > 1e-3
    assert pipe.nfe_per_image(10, 2.0) == 20 and pipe.nfe_per_image(10, 2.0, 5.0) == 30
    assert pipe.nfe_per_image(10, 1.0, 5.0) == 20


def test_combine_guidance_is_instructpix2pix_text_guidance():
    v = {"full": torch.tensor(3.0), "prompt": torch.tensor(2.0), "empty": torch.tensor(1.0)}
    assert combine_guidance(v, 2.0, 4.0).item() == 1.0 + 2.0 * (2.0 - 1.0) + 4.0 * (3.0 - 2.0)
    assert combine_guidance({"full": v["full"], "prompt": v["prompt"]}, 1.0, 4.0).item() == 2.0 + 4.0
    assert combine_guidance({"full": v["full"], "empty": v["empty"]}, 2.0).item() == 1.0 + 2.0 * 2.0
    assert guidance_branches(1.0) == ("full",) and guidance_branches(2.0, 3.0) == ("full", "prompt", "empty")


def test_condition_position_reaches_the_corrector_and_is_validated(flux):
    _random_lora(flux.transformer, 4, 4)
    beside, aligned = (ReflectionFluxPipeline(flux, condition_size=32, condition_position=p) for p in ("beside", "aligned"))
    flawed = beside(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))[0]
    kwargs = dict(image=flawed, reflection="make it blue", height=64, width=64, num_inference_steps=2, output_type="np")
    a = beside(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs)
    b = aligned(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs)
    assert np.abs(a - b).max() > 1e-4
    with pytest.raises(ValueError, match="condition_position"):
        ReflectionFluxPipeline(flux, condition_position="above")


def test_corrector_requests_use_their_own_t5_length(flux):
    """A corrector trained with longer T5 texts than the base model: each sees its own padding length."""
    _random_lora(flux.transformer, 4, 4)
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    short, long = (ReflectionFluxPipeline(flux, condition_size=32, max_sequence_length=n) for n in (16, 48))
    mixed = ReflectionFluxPipeline(flux, condition_size=32, max_sequence_length=16, corrector_max_sequence_length=48)
    base = short(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))[0]
    np.testing.assert_allclose(mixed(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs),
                               short(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs), atol=1e-6)
    correct = dict(image=base, reflection="make it blue", **kwargs)
    expected = long(PROMPT, generator=torch.Generator().manual_seed(1), **correct)
    np.testing.assert_allclose(mixed(PROMPT, generator=torch.Generator().manual_seed(1), **correct), expected, atol=1e-6)
    assert np.abs(short(PROMPT, generator=torch.Generator().manual_seed(1), **correct) - expected).max() > 1e-4


def test_batched_chains_equal_one_by_one_and_share_caches(flux):
    _random_lora(flux.transformer, 4, 4)
    pipe = ReflectionFluxPipeline(flux, attention="causal", condition_size=32, micro_batch=2)
    flawed = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))[0]
    noises = torch.stack([pipe.initial_noise(s, 64, 64) for s in range(3)])
    reflections = ["make it blue", "make it blue", "add a dog"]
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    batched = pipe.generate([PROMPT] * 3, noises=noises, conditions=[flawed] * 3, reflections=reflections, **kwargs)
    for i in range(3):
        single = pipe.generate([PROMPT], noises=noises[i : i + 1], conditions=[flawed], reflections=reflections[i : i + 1], **kwargs)
        np.testing.assert_allclose(batched[i], single[0], atol=1e-5)
    assert len(pipe._text_cache) == 2 + 1  # two corrector texts + the base prompt, each encoded once
