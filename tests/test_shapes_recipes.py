"""The shapes miniature's recipes through the real configs: shared flow matching, the VAE and the base
model a few steps end to end, products cached by config and loadable by the project's loaders."""

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli as run_app
from PIL import Image

from reflectionflow.models.flow_matching import flow_matching_loss

FAST_TEXT = [
    "trainer.max_steps=2",
    "data.batch_size=8",
    "model.probe_examples=40",
    "trainer.log_every_n_steps=1",
]
FAST_VAE = [
    "trainer.max_steps=2",
    "data.batch_size=4",
    "model.eval_per_category=1",
    "trainer.log_every_n_steps=1",
]
FAST_BASE = [
    "trainer.max_steps=2",
    "data.batch_size=4",
    "model.eval_per_category=1",
    "model.eval_steps=2",
    "trainer.log_every_n_steps=1",
    "model.transformer.num_layers=1",
    "model.transformer.num_single_layers=1",
]


def run_cli(run_dir, experiment, *overrides, cache):
    return run_app("train", f"experiment={experiment}", f"hydra.run.dir={run_dir}", *overrides, cache=cache)


def latest(cache: Path, recipe: str) -> Path:
    """The one sealed product of `recipe` in `cache` (each test module builds one per recipe)."""
    (product,) = [p for p in (cache / "recipes").glob(f"{recipe}-*") if (p / "DONE").is_file()]
    return product


def build_fast(cache: Path, runs: Path, recipe: str, *overrides: str) -> Path:
    """A few-step build of `recipe` through the CLI (dependencies given as product paths in `overrides`)."""
    fast = {"shapes_text": FAST_TEXT, "shapes_vae": FAST_VAE, "shapes_base": FAST_BASE}[recipe]
    result = run_cli(runs / recipe, recipe, *fast, *overrides, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return latest(cache, recipe)


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """(cache, text product, VAE product) of few-step recipe runs."""
    cache, runs = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    return cache, build_fast(cache, runs, "shapes_text"), build_fast(cache, runs, "shapes_vae")


@pytest.fixture(scope="module")
def vae_product(products):
    cache, _, vae = products
    return cache, vae


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    x0 = torch.zeros(3, 5, 8)  # x_t = t * noise, so the velocity noise - x0 is x_t / t
    generator = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(lambda xt, t: xt / t[:, None, None], x0, generator)
    assert loss.item() < 1e-8
    wrong = flow_matching_loss(lambda xt, t: torch.zeros_like(xt), x0, torch.Generator().manual_seed(0))
    assert wrong.item() > 0.1


def test_vae_recipe_writes_an_8x_16_channel_vae_with_checker_metrics(vae_product):
    from diffusers import AutoencoderKL

    _, product = vae_product
    vae = AutoencoderKL.from_pretrained(product / "vae")
    assert vae.config.latent_channels == 16 and 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.scaling_factor != 1.0  # set from the latent statistics at export
    metrics = json.loads((product / "metrics.json").read_text())
    per_tag = metrics["per_tag"]  # one scene per category (eval_per_category=1)
    assert len(per_tag) == 6 and metrics["accuracy"] == pytest.approx(sum(per_tag.values()) / 6)
    with Image.open(product / "reconstructions.png") as sheet:  # a row per category: input | round trip
        assert sheet.height > 6 * 144 and sheet.width > 2 * 144


def test_a_new_recipe_version_keys_a_new_product(monkeypatch, compose_config):
    from reflectionflow import recipes

    cfg = compose_config("train", "experiment=shapes_vae")
    before = recipes.product_dir(cfg)
    assert before.name.startswith("shapes_vae-") and recipes.product_dir(cfg) == before
    logging_only = compose_config("train", "experiment=shapes_vae", "callbacks.lr_monitor=null")
    assert recipes.product_dir(logging_only) == before  # a callback that logs does not shape the weights
    ema = "+callbacks.ema={_target_:lightning.pytorch.callbacks.EMAWeightAveraging,decay:0.99}"
    assert recipes.product_dir(compose_config("train", "experiment=shapes_vae", ema)) != before
    monkeypatch.setattr(recipes, "RECIPE_VERSION", recipes.RECIPE_VERSION + 1)
    assert recipes.product_dir(cfg) != before


def test_a_second_run_with_the_same_config_reuses_the_product(vae_product, tmp_path):
    cache, product = vae_product
    before = (product / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    result = run_cli(tmp_path / "again", "shapes_vae", *FAST_VAE, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing" in result.stdout + result.stderr
    assert (product / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    assert not (tmp_path / "again" / "logs").exists()  # nothing trained


def test_base_recipe_saves_a_flux_pipeline_the_project_loads(products, tmp_path):
    from safetensors.torch import load_file

    from reflectionflow.models.loading import load_flux_pipeline

    cache, text, vae = products
    product = build_fast(cache, tmp_path, "shapes_base", f"model.vae_path={vae}", f"model.text_path={text}")
    assert product.name.startswith("shapes_base-")
    flux = load_flux_pipeline(str(product))
    assert flux.vae_scale_factor == 8 and flux.transformer.config.num_layers == 1
    frozen = load_file(text / "text_encoder_2" / "model.safetensors")
    exported = load_file(product / "text_encoder_2" / "model.safetensors")
    assert frozen.keys() == exported.keys() and all(torch.equal(frozen[k], exported[k]) for k in frozen)
    metrics = json.loads((product / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(sum(metrics["per_tag"].values()) / 6)
    assert metrics["global_step"] == 2
    with Image.open(product / "samples.png") as sheet:  # a row per category, samples with their verdicts
        assert sheet.height > 6 * 144


def test_a_pool_stream_reshuffles_the_same_keyed_examples_every_epoch():
    from torch.utils.data import DataLoader

    from reflectionflow.shapes.pairs import ShapesPairs

    pool = ShapesPairs("train", 48, seed=3, pool_size=6)
    stream = iter(pool)
    epochs = [[next(stream) for _ in range(6)] for _ in range(3)]
    orders = [[s["key"] for s in epoch] for epoch in epochs]
    assert all(sorted(order) == list(range(6)) for order in orders) and len({tuple(o) for o in orders}) > 1
    by_key = {s["key"]: s for s in epochs[0]}
    for sample in epochs[1] + epochs[2]:  # an index is one example, whichever epoch draws it
        assert sample["prompt"] == by_key[sample["key"]]["prompt"]
        assert torch.equal(sample["image"], by_key[sample["key"]]["image"])
    two_workers = DataLoader(pool, batch_size=None, num_workers=2)
    first_epoch = [s["key"] for s, _ in zip(two_workers, range(6), strict=False)]
    assert sorted(first_epoch) == list(range(6))  # the workers split the pool, no index twice
    with pytest.raises(ValueError, match="data.pool_size"):
        ShapesPairs(pool_size=0)


def test_ddp_ranks_read_disjoint_slices_of_the_pool_and_distinct_streams(monkeypatch):
    from reflectionflow.shapes.pairs import ShapesPairs

    def first(rank: int, n: int, pool_size: int | None) -> list:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun and Lightning's DDP launchers set them
        monkeypatch.setenv("RANK", str(rank))
        stream = iter(ShapesPairs("train", 48, seed=0, pool_size=pool_size))
        return [next(stream) for _ in range(n)]

    keys = [{s["key"] for s in first(rank, 4, pool_size=8)} for rank in (0, 1)]
    assert keys[0].isdisjoint(keys[1]) and keys[0] | keys[1] == set(range(8))
    endless = [first(rank, 4, pool_size=None) for rank in (0, 1)]
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(*endless, strict=True))


def test_cached_latents_equal_fresh_encodings_and_are_encoded_once(products, monkeypatch):
    from reflectionflow.shapes.base import TextToImageModule
    from reflectionflow.shapes.pairs import ShapesPairs

    _, text, vae = products
    tiny = dict(
        text_path=str(text),
        transformer=dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                         axes_dims_rope=[4, 6, 6]),
    )
    stream = iter(ShapesPairs("train", 48, seed=0, pool_size=4))
    samples = [next(stream) for _ in range(4)]
    batch = {"image": torch.stack([s["image"] for s in samples]), "key": torch.tensor([s["key"] for s in samples])}
    fresh = TextToImageModule(str(vae), **tiny).latents(batch)
    cached = TextToImageModule(str(vae), cache_latents=True, **tiny)
    assert torch.equal(cached.latents(batch), fresh) and len(cached.latent_cache) == 4

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached example was encoded again")

    monkeypatch.setattr(cached.pipe.vae, "encode", no_encoding)
    reordered = {"image": batch["image"].flip(0), "key": batch["key"].flip(0)}
    assert torch.equal(cached.latents(reordered), fresh.flip(0))
    assert torch.equal(cached.latents({"image": batch["image"]}), fresh)  # found by its pixels, keyed or not
