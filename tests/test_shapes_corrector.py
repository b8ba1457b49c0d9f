"""Recipe 3/3 of the shapes miniature through the real CLI on a tiny base model: triplet shards the GenRef
datamodule reads (cached by config), the corrector LoRA the project's loader takes, held-out fix rates."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import compose_app
from hydra.utils import instantiate
from test_shapes_recipes import build_fast, latest, run_cli

from reflectionflow.shapes.evaluation import EDIT_TYPES

FAST_CORRECTOR = [
    "data.model_samples=8",
    "data.rendered=24",
    "data.sample_steps=2",
    "data.sample_batch=8",
    "data.samples_per_shard=16",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    "data.queue_size=8",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "model.lora_rank=4",
    "model.eval_per_category=1",
    "model.eval_steps=2",
    "data.num_val_samples=6",
    "callbacks.diagnostics.every_n_steps=1",
]


@pytest.fixture(scope="module")
def corrector_run(tmp_path_factory):
    """A tiny text encoder, VAE and base model, then the corrector recipe on them (all through the CLI)."""
    cache = tmp_path_factory.mktemp("cache")
    runs = tmp_path_factory.mktemp("runs")
    text, vae = build_fast(cache, runs, "shapes_text"), build_fast(cache, runs, "shapes_vae")
    base = build_fast(cache, runs, "shapes_base", f"model.vae_path={vae}", f"model.text_path={text}")
    overrides = [f"model.path={base}", *FAST_CORRECTOR]
    result = run_cli(runs / "corrector", "shapes_corrector", *overrides, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return cache, base, latest(cache, "shapes_corrector"), overrides, runs / "corrector"


def compose_data(cache: Path, overrides: list[str]):
    """The recipe's data config, composed and instantiated in this process against `cache`."""
    previous = os.environ.get("REFLECTIONFLOW_CACHE")
    os.environ["REFLECTIONFLOW_CACHE"] = str(cache)
    try:
        return instantiate(compose_app("train", "experiment=shapes_corrector", *overrides).data)
    finally:
        if previous is None:
            os.environ.pop("REFLECTIONFLOW_CACHE")
        else:
            os.environ["REFLECTIONFLOW_CACHE"] = previous


def test_recipe_trains_the_lora_on_shards_the_genref_datamodule_reads(corrector_run):
    from reflectionflow.data import GenRefDataModule

    cache, _, product, _, run = corrector_run
    assert product.name.startswith("shapes_corrector-")
    (shards,) = [d for d in (cache / "recipes").glob("shapes_triplets-*") if d.is_dir()]
    assert not list((cache / "recipes").glob("*.tmp-*")), "a temporary shard directory was left behind"
    stats = json.loads((shards / "stats.json").read_text())
    made = stats["model_samples"] - stats["model_samples_already_correct"] - stats["model_samples_unusable"]
    assert stats["by_source"].get("model", 0) == made - stats["model_samples_reflector_error"]
    assert stats["by_source"]["rendered"] == 24 and stats["triplets"] == sum(stats["by_subset"].values())
    assert set(stats["by_subset"]) <= {"general", "editing"}

    datamodule = GenRefDataModule(str(shards / "shapes-*.tar"), batch_size=4, num_workers=0, target_size=48,
                                  condition_size=48, resampled=False, shuffle_buffer=0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["condition"].shape == (4, 3, 48, 48)
    assert all(subset in ("general", "editing") for subset in batch["subset"])
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "diagnostics/t0.9/condition_ratio", "diagnostics/t0.3/real_unchanged"} <= set(header)


def test_lora_loads_with_the_project_loader_and_changes_the_corrector(corrector_run):
    from reflectionflow.models.corrector import condition_ids, corrector_forward, latent_ids
    from reflectionflow.models.loading import load_flux_pipeline

    _, base, product, _, _ = corrector_run
    plain = load_flux_pipeline(str(base)).transformer
    tuned = load_flux_pipeline(str(base), lora_path=str(product / "lora")).transformer
    config = plain.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 9, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]), img_ids=latent_ids(6, 6), txt_ids=torch.zeros(5, 3),
        cond_hidden_states=torch.randn(1, 9, config.in_channels, generator=g),
        cond_ids=condition_ids(48, vae_scale_factor=8),
    )
    with torch.no_grad():
        assert not torch.allclose(corrector_forward(plain, **inputs), corrector_forward(tuned, **inputs))


def test_metrics_hold_the_four_ablations_and_the_base_model(corrector_run):
    _, _, product, _, _ = corrector_run
    metrics = json.loads((product / "metrics.json").read_text())
    for name in ("full", "no_reflection", "no_condition", "condition_only"):
        per_tag = metrics[name]["per_tag"]  # one case per category (eval_per_category=1)
        assert len(per_tag) == 6 and metrics[name]["fix_rate"] == pytest.approx(sum(per_tag.values()) / 6)
        assert set(metrics[name]["per_edit_count"]) <= {"1 edit", "2+ edits"}
        assert set(metrics[name]["per_edit_type"]) <= set(EDIT_TYPES) and metrics[name]["per_edit_type"]
        assert 0.0 <= metrics[name]["edited_cells"] <= 1.0 and 0.0 <= metrics[name]["kept_cells"] <= 1.0
    assert metrics["already_correct"] == 0.0  # flawed renders fail the checker by construction
    assert (product / "corrections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = metrics["base_model"]
    assert base["accuracy"] == pytest.approx(sum(base["per_tag"].values()) / 6) and metrics["global_step"] == 2


def test_triplet_shards_are_cached_by_config(corrector_run):
    cache, _, _, overrides, _ = corrector_run
    datamodule = compose_data(cache, overrides)
    assert (datamodule.directory / "stats.json").is_file()  # the CLI run's shards, found again
    before = (datamodule.directory / "stats.json").stat().st_mtime_ns
    assert datamodule.check() and (datamodule.directory / "stats.json").stat().st_mtime_ns == before
    changed = compose_data(cache, [*overrides, "data.rendered=25"])
    assert changed.directory != datamodule.directory and not changed.directory.exists()


def test_bad_data_config_fails_in_one_line(tmp_path):
    from reflectionflow.shapes.triplets import ShapesTripletsDataModule

    with pytest.raises(ValueError, match="editing_fraction"):
        ShapesTripletsDataModule(str(tmp_path), editing_fraction=1.5)
    with pytest.raises(ValueError, match="model_samples"):
        ShapesTripletsDataModule(str(tmp_path), model_samples=0, rendered=0)
    with pytest.raises(ValueError, match="rendered_weighting"):
        ShapesTripletsDataModule(str(tmp_path), rendered_weighting="failures")
    with pytest.raises(ValueError, match="model_failures needs data.model_samples"):
        ShapesTripletsDataModule(str(tmp_path), model_samples=0, rendered_weighting="model_failures")
    with pytest.raises(ValueError, match="rendered_compound"):
        ShapesTripletsDataModule(str(tmp_path), rendered_compound=2.0)
