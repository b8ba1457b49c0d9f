"""Ready for many GPUs, checked on CPU: Prodigy under sharding, checkpoint contents per strategy."""

import os
import socket

import numpy as np
import pytest
import torch
from conftest import compose_app
from helpers.cli import run_cli
from hydra.utils import instantiate
from safetensors.torch import load_file

from reflectionflow.models.optim import Prodigy, build_optimizers, effective_lr

STEPS = 40


def _toy_model() -> torch.nn.Module:
    """33 rows: FSDP2 shards them unevenly over 2 ranks; the zero-initialised last layer is LoRA's B."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 8))
    torch.nn.init.zeros_(model[2].weight)
    return model


def _prodigy_factory():
    return instantiate(compose_app("train", "optimizer@model.optimizer=prodigy").model.optimizer)


def _train(model, optimizer) -> list[float]:
    """d after every step; the same batches on every rank, so the averaged gradient is the unsharded one."""
    ds = []
    for step in range(STEPS):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        model(x).sub(1.0).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ds.append(optimizer.param_groups[0]["d"])
    return ds


def _full(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def test_unsharded_prodigy_steps_like_prodigyopt():
    prodigyopt = pytest.importorskip("prodigyopt")
    settings = dict(lr=1.0, use_bias_correction=True, safeguard_warmup=True, weight_decay=0.01)
    ours, reference = _toy_model(), _toy_model()
    ds = _train(ours, Prodigy(ours.parameters(), **settings))
    reference_ds = _train(reference, prodigyopt.Prodigy(reference.parameters(), **settings))
    assert ds[-1] > 3 * ds[0]  # d grew: the estimate is exercised, not stuck at d0
    torch.testing.assert_close(torch.tensor(ds), torch.tensor(reference_ds), rtol=1e-5, atol=0)
    for name, value in _full(ours).items():
        torch.testing.assert_close(value, _full(reference)[name], rtol=1e-5, atol=1e-7)


def test_build_optimizers_tells_prodigy_and_only_prodigy_that_parameters_are_sharded():
    params = list(_toy_model().parameters())
    assert build_optimizers(params, _prodigy_factory(), None, 1e-4, sharded=True).param_groups[0]["fsdp_in_use"]
    assert not build_optimizers(params, _prodigy_factory(), None, 1e-4).param_groups[0]["fsdp_in_use"]
    adamw = instantiate(compose_app("train").model.optimizer)
    assert isinstance(build_optimizers(params, adamw, None, 1e-4, sharded=True), torch.optim.AdamW)


def test_effective_lr_is_d_times_lr_for_prodigy():
    model = _toy_model()
    optimizer = Prodigy(model.parameters(), lr=0.5)
    _train(model, optimizer)
    assert effective_lr(optimizer) == pytest.approx(0.5 * optimizer.param_groups[0]["d"])
    assert effective_lr(torch.optim.AdamW(model.parameters(), lr=3e-4)) == pytest.approx(3e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_prodigy_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        model = _toy_model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = build_optimizers(model.parameters(), _prodigy_factory(), None, 1e-4, sharded=True)
        ds = _train(model, optimizer)
        results[rank] = (ds, _full(model))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_prodigy_estimates_the_unsharded_d_on_every_rank():
    import torch.multiprocessing as mp

    reference = _toy_model()
    reference_ds = _train(reference, build_optimizers(reference.parameters(), _prodigy_factory(), None, 1e-4))
    results = mp.Manager().dict()
    mp.start_processes(_fsdp2_prodigy_worker, args=(2, _free_port(), results), nprocs=2, start_method="fork")
    assert sorted(results.keys()) == [0, 1]
    for rank in (0, 1):
        ds, weights = results[rank]
        torch.testing.assert_close(torch.tensor(ds), torch.tensor(reference_ds), rtol=1e-5, atol=0)
        for name, value in _full(reference).items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- strategies
def test_deepspeed_config_is_zero2_without_frozen_weights_in_checkpoints():
    strategy_cfg = compose_app("train", "trainer=deepspeed").trainer.strategy
    assert strategy_cfg._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy_cfg.stage == 2 and strategy_cfg.exclude_frozen_parameters is True
    pytest.importorskip("deepspeed", reason="deepspeed not installed: the config object above is what runs")
    from reflectionflow.models.strategies import shards_parameters

    strategy = instantiate(strategy_cfg)  # Lightning passes this flag to engine.save_checkpoint
    assert strategy.exclude_frozen_parameters and shards_parameters(strategy)


def test_ddp_config_keeps_gradients_in_the_buckets():
    strategy = instantiate(compose_app("train", "trainer=ddp").trainer.strategy)
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True} and strategy._start_method == "popen"
    from reflectionflow.models.strategies import shards_parameters

    assert not shards_parameters(strategy)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer=deepspeed", "trainer.strategy.stage=3"], "DeepSpeed ZeRO-3 is not supported"),
        (["trainer=gpu", "trainer.strategy=deepspeed_stage_3_offload"], "DeepSpeed ZeRO-3 is not supported"),
        (["trainer=fsdp", "optimizer@model.optimizer=adamw8bit"], "bitsandbytes' 8-bit states do not support"),
    ],
)
def test_unsupported_strategy_combinations_are_refused_in_one_line(overrides, message):
    from reflectionflow.config import ConfigError
    from reflectionflow.train import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose_app("train", "experiment=tiny", *overrides))


def _fsdp2_state_dict_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from reflectionflow.models.strategies import FSDP2Strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _toy_model()
        model[0].requires_grad_(False)  # the frozen base
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        strategy = FSDP2Strategy()
        strategy.model = model
        state = strategy.lightning_module_state_dict()
        results[rank] = {k: tuple(v.shape) for k, v in state.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_checkpoint_gathers_only_trainable_parameters():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_fsdp2_state_dict_worker, args=(2, _free_port(), results), nprocs=2, start_method="fork")
    assert results[0] == {"2.weight": (8, 33), "2.bias": (8,)}  # full tensors, and no frozen layer 0
    assert results[1] == {}  # only rank 0 receives the gathered state


FAST = ["experiment=tiny", "trainer.log_every_n_steps=1", "model.lora_rank=4", "validation.every_n_steps=0"]
FSDP2_PRODIGY = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                 "optimizer@model.optimizer=prodigy", "checkpoint.every_n_steps=2",
                 "model.concurrent_loads=1"]  # the two ranks load FLUX in turns


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _trainable_shapes() -> dict[str, tuple[int, ...]]:
    """The LoRA parameters the tiny corrector trains (dead-end adapters excluded), built unsharded."""
    module = instantiate(compose_app("train", *FAST).model)
    module.configure_model()
    return {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_fsdp2_prodigy_checkpoint_holds_exactly_the_lora_and_its_optimizer_state_and_resumes(tmp_path, cache,
                                                                                               monkeypatch):
    def train(run_dir, *overrides):
        result = run_cli("train", *FAST, *FSDP2_PRODIGY, f"hydra.run.dir={run_dir}", *overrides, cache=cache)
        assert result.returncode == 0, result.stderr[-4000:]

    train(tmp_path / "stopped", "trainer.max_steps=2")
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "step-0000002.ckpt"  # a link, not a second copy
    state = torch.load(last, map_location="cpu", weights_only=False)
    monkeypatch.setenv("REFLECTIONFLOW_CACHE", str(cache))
    trainable = _trainable_shapes()
    assert {k: tuple(v.shape) for k, v in state["state_dict"].items()} == trainable
    optimizer = state["optimizer_states"][0]
    names = optimizer["param_groups"][0]["params"]
    assert len(names) == len(optimizer["state"]) == len(trainable)
    shapes = sorted(trainable.values())
    assert sorted(tuple(s["exp_avg"].shape) for s in optimizer["state"].values()) == shapes  # gathered, full
    assert optimizer["param_groups"][0]["fsdp_in_use"] and optimizer["param_groups"][0]["k"] == 2

    train(tmp_path / "stopped", "trainer.max_steps=3", "resume=true", "logger.csv.version=resumed")
    train(tmp_path / "straight", "trainer.max_steps=3")
    a = load_file(tmp_path / "straight" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "stopped" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- inference
def _corrector_pipeline(tiny_flux_path, **kwargs):
    from reflectionflow.models.lora import add_lora
    from reflectionflow.models.pipeline import ReflectionFluxPipeline
    from reflectionflow.models.settings import CorrectorSettings

    settings = CorrectorSettings(condition_size=32, max_sequence_length=16, attention=kwargs.pop("attention", "union"))
    pipe = ReflectionFluxPipeline.from_pretrained(str(tiny_flux_path), settings=settings, **kwargs)
    add_lora(pipe.transformer, rank=4)
    torch.manual_seed(1)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return pipe


def test_text_cache_stays_within_its_bound_in_cpu_memory(tiny_flux_path):
    pipe = _corrector_pipeline(tiny_flux_path, text_cache_size=3)
    texts = [f"a red cat number {i}" for i in range(5)]
    t5, pooled = pipe.encode_text(texts, texts)  # more new texts in one call than the cache holds
    assert t5.shape[0] == pooled.shape[0] == 5 and len(pipe._text_cache) == 3
    again, _ = pipe.encode_text(texts[:1], texts[:1])
    torch.testing.assert_close(again[0], t5[0])
    for i in range(10):
        pipe.encode_text([f"a blue dog {i}"], ["a blue dog [Reflexion] make it green"])
        assert len(pipe._text_cache) <= 3
    assert all(e.t5.device.type == "cpu" and e.pooled.device.type == "cpu" for e in pipe._text_cache.values())


def test_cpu_offload_gives_the_same_images(tiny_flux_path):
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    pipe = _corrector_pipeline(tiny_flux_path)
    flawed = pipe("a red cat", generator=torch.Generator().manual_seed(0), **{**kwargs, "output_type": "pil"})[0]

    def correct(p):
        return p("a red cat", image=flawed, reflection="make it blue", generator=torch.Generator().manual_seed(1),
                 **kwargs)

    expected = correct(pipe)
    offloaded = _corrector_pipeline(tiny_flux_path)
    offloaded.enable_model_cpu_offload("cpu")  # the hooks' code path; on a GPU the weights move in and out
    np.testing.assert_allclose(correct(offloaded), expected, atol=1e-6)
    assert offloaded.transformer._hf_hook is not None


@pytest.mark.slow
def test_compiled_transformer_blocks_give_the_same_images(tiny_flux_path):
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    pipe = _corrector_pipeline(tiny_flux_path, attention="causal")
    flawed = pipe("a red cat", generator=torch.Generator().manual_seed(0), **{**kwargs, "output_type": "pil"})[0]
    expected = pipe("a red cat", image=flawed, reflection="make it blue", generator=torch.Generator().manual_seed(1),
                    **kwargs)
    pipe.compile_transformer()
    compiled = pipe("a red cat", image=flawed, reflection="make it blue", generator=torch.Generator().manual_seed(1),
                    **kwargs)
    np.testing.assert_allclose(compiled, expected, atol=1e-5)


def test_adamw8bit_config_keeps_8bit_states():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pytest.skip("bitsandbytes is not installed (pip install bitsandbytes)")
    param = torch.nn.Parameter(torch.randn(64, 64))  # >= 4096 elements: bitsandbytes' 8-bit threshold
    param.grad = torch.randn(64, 64)
    factory = instantiate(compose_app("train", "optimizer@model.optimizer=adamw8bit").model.optimizer)
    optimizer = build_optimizers([param], factory, None, 1e-4)
    before = param.detach().clone()
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"bitsandbytes cannot run its 8-bit optimizer here: {err}")
    assert optimizer.state[param]["state1"].dtype == torch.uint8 and not torch.equal(param, before)


# ---------------------------------------------------------------------------------------------------- text embeddings
def _genref_batch(pattern: str, text_embeddings: str | None) -> dict:
    from reflectionflow.data import GenRefDataModule

    datamodule = GenRefDataModule(pattern, batch_size=8, num_workers=0, target_size=64, condition_size=32,
                                  drop_text=0.2, drop_image=0.2, drop_reflection=0.4, seed=1, shuffle_buffer=4,
                                  rank=0, world_size=1, accumulate_grad_batches=1, text_embeddings=text_embeddings)
    return datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)


def _corrector_module(tiny_flux_path, **kwargs):
    from reflectionflow.models.module import ReflectionTuningModule

    module = ReflectionTuningModule(path=str(tiny_flux_path), lora_rank=4, condition_size=32, max_sequence_length=64,
                                    **kwargs)
    torch.manual_seed(0)
    module.configure_model()
    return module


def test_precomputed_text_embeddings_give_the_loss_of_on_the_fly_encoding(tmp_path, tiny_flux_path, capsys):
    from reflectionflow.data import write_synthetic_shards
    from reflectionflow.data.text_embeddings import main

    write_synthetic_shards(tmp_path, num_shards=2, samples_per_shard=6, image_size=64, seed=0)
    pattern = str(tmp_path / "genref_{0000..0001}.tar")
    main(["--model", str(tiny_flux_path), "--shards", pattern, "--max-sequence-length", "64", "--dtype", "float32",
          "--device", "cpu", "--batch-size", "4"])
    assert "data.text_embeddings=text64" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.text64")) == ["genref_0000.text64", "genref_0001.text64"]

    precomputed, encoded = _genref_batch(pattern, "text64"), _genref_batch(pattern, None)
    assert precomputed["t5_text"] == encoded["t5_text"] and "t5_embeds" not in encoded
    texts = precomputed["t5_text"]  # all three precomputed texts are read: dropped, prompt alone, with reflection
    assert "" in texts and any(t == p for t, p in zip(texts, precomputed["prompt"], strict=True))
    assert any("[Reflexion]" in t for t in texts)

    lean = _corrector_module(tiny_flux_path, text_embeddings="text64")
    assert lean.pipe.text_encoder is None and lean.pipe.text_encoder_2 is None
    full = _corrector_module(tiny_flux_path)
    loss = full.flow_matching_loss(encoded, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lean.flow_matching_loss(precomputed, torch.Generator().manual_seed(0)), loss)


def test_text_embeddings_are_checked_before_the_model_loads(tmp_path, tiny_flux_path):
    from reflectionflow.config import ConfigError
    from reflectionflow.data import ShardSourceError, write_synthetic_shards
    from reflectionflow.train import check_config, check_text_embedding_settings

    write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=2, image_size=64)
    with pytest.raises(ShardSourceError, match="no text embeddings .*genref_0000.text512"):
        _genref_batch(str(tmp_path / "genref_0000.tar"), "text512")
    with pytest.raises(ConfigError, match="set callbacks.validation=null callbacks.validation_metrics=null"):
        check_config(compose_app("train", "experiment=tiny", "data.text_embeddings=text64"))
    cfg = compose_app("train", "experiment=tiny", "data.text_embeddings=text64")
    with pytest.raises(ConfigError, match="max_sequence_length=512, but the run trains with 64"):
        check_text_embedding_settings(cfg, {"model": "tiny", "max_sequence_length": 512, "dtype": "float32"})


# ---------------------------------------------------------------------------------------------------- benchmark
def _gpu_benchmark(capfd, *args: str):
    """`python benchmarks/gpu.py <args>` in this process (`capfd`: pytest's fixture, for what it printed), the
    torch thread count and random state it sets put back afterwards."""
    import runpy
    import subprocess
    import sys
    from unittest import mock

    from helpers.cli import ROOT

    threads, code = torch.get_num_threads(), 0
    capfd.readouterr()  # not what the test printed before
    try:
        with torch.random.fork_rng(), mock.patch.object(sys, "argv", ["benchmarks/gpu.py", *args]):
            runpy.run_path(str(ROOT / "benchmarks" / "gpu.py"), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1 if exit_.code else 0
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = capfd.readouterr()
    return subprocess.CompletedProcess(["benchmarks/gpu.py", *args], code, stdout, stderr)


def test_gpu_benchmark_says_so_in_one_line_without_a_gpu(capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark measures instead")
    result = _gpu_benchmark(capfd)
    assert result.returncode == 0 and result.stdout.strip().splitlines() == [
        "no CUDA GPU on this machine: nothing measured (python benchmarks/gpu.py --small runs the code on CPU)"]


def test_gpu_benchmark_runs_its_code_at_toy_width_on_cpu(capfd):
    result = _gpu_benchmark(capfd, "--small")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    train = [line for line in lines if line.startswith("train step")]
    assert len(train) == 4 and all("x stock" in line for line in train)  # batch 1 and 4, with and without
    assert any(line.startswith("4-step corrected image: union") and "causal + KV cache" in line for line in lines)
    assert sum(line.startswith("search width 4") and "images/s" in line for line in lines) == 2


# ---------------------------------------------------------------------------------------------------- throughput
def test_step_flops_counted_on_meta_equal_the_real_step(tiny_flux_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from reflectionflow.models.corrector import condition_ids, corrector_forward, latent_ids

    module = _corrector_module(tiny_flux_path)
    config = module.transformer.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 64, generator=g), timestep=torch.rand(2, generator=g),
        encoder_hidden_states=torch.randn(2, 64, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g), img_ids=latent_ids(8, 8),
        txt_ids=torch.zeros(64, 3), guidance=torch.ones(2), cond_hidden_states=torch.randn(2, 4, 64, generator=g),
        cond_ids=condition_ids(32),
    )
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # CPU SDPA kernels go uncounted
        corrector_forward(module.transformer, **inputs).sum().backward()
    batch = {"image": torch.zeros(2, 3, 64, 64), "condition": torch.zeros(2, 3, 32, 32)}
    assert module.count_step_flops(batch) == counter.get_total_flops() > 0


def test_throughput_monitor_logs_samples_and_flops_per_second(tmp_path, cache, monkeypatch):
    import csv

    from reflectionflow.train import train

    monkeypatch.setenv("REFLECTIONFLOW_CACHE", str(cache))
    run = tmp_path / "run"
    train(compose_app("train", *FAST, f"paths.run_dir={run}", "trainer.max_steps=11", "callbacks.validation=null",
                      "callbacks.validation_metrics=null", "checkpoint.every_n_steps=0"))
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/device/samples_per_sec", "train/device/flops_per_sec", "train/lr_effective"} <= logged
    samples = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    assert samples and all(s > 0 for s in samples)
