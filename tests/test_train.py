"""Reflection tuning through the real configs: CLI runs (in this process; multi-process and killed runs in
real interpreters), exact resume, strategies, loggers, bad input."""

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import compose_app
from helpers.cli import cli_command, cli_env
from helpers.cli import run_cli as run_app
from helpers.cli import run_in_process as run_app_in_process
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from reflectionflow.models.callbacks import VALIDATION_COLUMNS
from reflectionflow.models.corrector import condition_ids, corrector_forward, latent_ids

FAST = ["experiment=tiny", "trainer.log_every_n_steps=1", "model.lora_rank=4", "validation.num_inference_steps=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (tiny FLUX + synthetic shards) for every run of this module, in-process and CLI."""
    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("REFLECTIONFLOW_CACHE")
    os.environ["REFLECTIONFLOW_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("REFLECTIONFLOW_CACHE")
    else:
        os.environ["REFLECTIONFLOW_CACHE"] = previous


def run_cli(run_dir, *overrides, cache, timeout=600):
    return run_app("train", *FAST, f"hydra.run.dir={run_dir}", *overrides, cache=cache, timeout=timeout)


def cli_in_process(capfd, run_dir, *overrides, cache):
    """`run_cli` in this process (`capfd`: pytest's fixture, for what the run printed)."""
    return run_app_in_process("train", *FAST, f"hydra.run.dir={run_dir}", *overrides, capture=capfd, cache=cache)


def run_in_process(run_dir, *overrides):
    """`python -m reflectionflow.train ...` without a new interpreter: compose the real config, then train."""
    from reflectionflow.train import train

    return train(compose_app("train", *FAST, f"paths.run_dir={run_dir}", *overrides))


def losses(metrics_csv: Path) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_cli_tiny_run_trains_only_lora_and_writes_a_loadable_lora(tmp_path, cache, capfd):
    result = cli_in_process(capfd, tmp_path / "run", "trainer.max_steps=3", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    steps = losses(run / "logs" / "metrics.csv")
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert state["optimizer_states"] and state["lr_schedulers"]
    assert state["global_step"] == 3 and "GenRefDataModule" in state
    assert list((run / "validation").glob("*.png")), "the end-of-training validation panel is missing"
    with Image.open(run / "validation" / "step-0000003.png") as sheet:
        shown = sheet.text["Description"]
    held_out = instantiate(compose_app("train", *FAST).data).validation_samples()
    for sample in held_out:  # every held-out sample's prompt and reflection, as captions
        assert f"prompt: {sample['prompt']}" in shown and f"reflection: {sample['reflection']}" in shown
    with open(run / "logs" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("val/loss")][-1]
    ratios = [f"diagnostics/t{t}/{kind}_ratio" for t in (0.3, 0.6, 0.9) for kind in ("condition", "reflection")]
    for key in ["val/loss", *ratios]:
        assert torch.isfinite(torch.tensor(float(last[key]))), key

    from diffusers import FluxPipeline

    tiny = cache / "tiny-flux"
    base = FluxPipeline.from_pretrained(tiny)
    tuned = FluxPipeline.from_pretrained(tiny)
    tuned.load_lora_weights(run / "lora" / "final")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=latent_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([1.0]),
        cond_hidden_states=torch.randn(1, 4, 64, generator=g), cond_ids=condition_ids(32),
    )
    with torch.no_grad():
        assert not torch.equal(corrector_forward(base.transformer, **inputs), corrector_forward(tuned.transformer, **inputs))


def test_progress_bar_counts_steps_of_max_steps_also_after_resume(tmp_path, cache, capfd):
    common = ["callbacks.validation=null", "callbacks.validation_metrics=null"]
    first = cli_in_process(capfd, tmp_path / "run", "trainer.max_steps=3", *common, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli_in_process(capfd, tmp_path / "run", "trainer.max_steps=5", "resume=true", *common, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for done, start, end in [(first, 0, 3), (resumed, 3, 5)]:
        counts = re.findall(r"train:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[", done.stdout)
        assert counts[0] == (str(start), str(end)) and counts[-1] == (str(end), str(end)), counts
        assert "Epoch" not in done.stdout + done.stderr


def test_only_lora_parameters_change(tmp_path, cache):
    trainer = run_in_process(tmp_path / "run", "trainer.max_steps=2", "callbacks.validation=null")
    module = trainer.lightning_module
    from diffusers import FluxTransformer2DModel

    original = FluxTransformer2DModel.from_pretrained(cache / "tiny-flux", subfolder="transformer").state_dict()
    changed = {n for n, p in module.transformer.named_parameters()
               if "lora_" not in n and not torch.equal(p.detach(), original[n.replace(".base_layer", "")])}
    assert not changed
    lora_b = [p for n, p in module.transformer.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means LoRA trained


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, cache):
    common = ["checkpoint.every_n_steps=2", "callbacks.validation=null", "data.num_workers=2"]
    run_in_process(tmp_path / "straight", "trainer.max_steps=4", *common)
    run_in_process(tmp_path / "stopped", "trainer.max_steps=2", *common)
    first = losses(tmp_path / "stopped" / "logs" / "metrics.csv")
    run_in_process(tmp_path / "stopped", "trainer.max_steps=4", "resume=true", *common)

    straight = losses(tmp_path / "straight" / "logs" / "metrics.csv")
    both = losses(tmp_path / "stopped" / "logs" / "metrics.csv")  # the resumed launch appends its rows
    assert sorted(first) == [0, 1] and sorted(both) == [0, 1, 2, 3]
    assert both == straight
    a = load_file(tmp_path / "straight" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "stopped" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CHECKPOINTED = [
    "trainer.max_steps=4",
    "checkpoint.every_n_steps=1",
    "checkpoint.keep_last=2",
    "callbacks.validation=null",
    "callbacks.validation_metrics=null",
    "callbacks.lora=null",
]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, cache):
    """A finished 4-step run checkpointed every step, keeping 2: step-3, step-4 and last.ckpt -> step-4."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    run_in_process(run_dir, *CHECKPOINTED)
    return run_dir


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def test_resume_after_a_kill_between_a_checkpoint_and_last_takes_the_newest(tmp_path, checkpointed_run):
    """As if killed after writing step-4.ckpt, before removing step-2.ckpt and relinking last.ckpt."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed_run, run_dir, symlinks=True)
    checkpoints = run_dir / "checkpoints"
    shutil.copy(checkpoints / "step-0000003.ckpt", checkpoints / "step-0000002.ckpt")
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / "last.ckpt").symlink_to("step-0000003.ckpt")

    trainer = run_in_process(run_dir, *CHECKPOINTED, "trainer.max_steps=6", "resume=true")
    assert Path(trainer.ckpt_path).name == "step-0000004.ckpt"
    with open(run_dir / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5]  # the resumed launch starts at step 4, after the first launch's rows
    assert checkpoint_files(run_dir) == ["last.ckpt", "step-0000005.ckpt", "step-0000006.ckpt"]
    assert os.readlink(checkpoints / "last.ckpt") == "step-0000006.ckpt"


def test_a_moved_run_directory_resumes_into_its_own_last_ckpt_and_prunes(tmp_path, checkpointed_run):
    import shutil

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(checkpointed_run, moved, symlinks=True)
    run_in_process(moved, *CHECKPOINTED, "trainer.max_steps=6", "resume=true")
    # no last-v1.ckpt beside last.ckpt, and the old step files pruned
    assert checkpoint_files(moved) == ["last.ckpt", "step-0000005.ckpt", "step-0000006.ckpt"]
    assert os.readlink(moved / "checkpoints" / "last.ckpt") == "step-0000006.ckpt"


def test_wandb_offline_run_holds_the_validation_panel(tmp_path, cache, capfd):
    run_dir = tmp_path / "wandb-run-7c3f"
    result = cli_in_process(capfd, run_dir, "trainer.max_steps=2", "logger=wandb", "validation.every_n_steps=1",
                     "task_name=tinygroup5e", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    panels = list(runs[0].glob("files/media/images/validation/*.png"))
    assert panels, sorted(str(p) for p in runs[0].rglob("*"))[:50]
    tables = sorted(runs[0].glob("files/media/table/validation/samples_*.table.json"))
    assert len(tables) == 2  # one per validation step (steps 1 and 2)
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == list(VALIDATION_COLUMNS) and len(table["data"]) == 2  # the held-out samples
    [records] = runs[0].glob("run-*.wandb")
    logged = records.read_bytes()
    for key in ("val/loss", "diagnostics/t0.3/condition_ratio", "diagnostics/t0.9/reflection_ratio"):
        assert key.encode() in logged, key
    # named after the run directory, grouped by the experiment (protobuf strings: length, then bytes)
    assert b"\x0ewandb-run-7c3f" in logged and b"\x0btinygroup5e" in logged
    assert b"wandb-run-7c3f-lora" in logged and b"step-2" in logged  # the final LoRA as a model artifact
    assert f"  W&B        {runs[0]}/" in result.stdout


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer=deepspeed"], "DeepSpeed runs on CUDA GPUs only"),
        (["trainer.strategy=ddp_typo"], "trainer.strategy=ddp_typo is not a Lightning strategy"),
        (["model.path=/nonexistent/flux"], "model.path="),
        (["data.shards='/nonexistent/genref_{0..3}.tar'"], "/nonexistent/genref"),
    ],
)
def test_bad_input_fails_in_one_line_before_loading(tmp_path, cache, overrides, message, capfd):
    result = cli_in_process(capfd, tmp_path / "run", *overrides, cache=cache)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kind", ["text file as the only shard", "checkpoint of random bytes", "no checkpoint"])
def test_unusable_input_files_fail_in_one_line_naming_them(tmp_path, cache, kind, capfd):
    text, garbage = tmp_path / "genref_0000.tar", tmp_path / "last.ckpt"
    text.write_text("not a tar archive\n" * 64)
    garbage.write_bytes(os.urandom(4096))
    overrides, named = {
        "text file as the only shard": ([f"data.shards={text}"], str(text)),
        "checkpoint of random bytes": ([f"ckpt_path={garbage}"], f"ckpt_path={garbage} is not a Lightning checkpoint"),
        "no checkpoint": ([f"ckpt_path={tmp_path / 'none.ckpt'}"], "none.ckpt does not exist"),
    }[kind]
    result = cli_in_process(capfd, tmp_path / "run", *overrides, cache=cache)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "GPU available" not in result.stdout  # before the Trainer
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_optimizer_is_a_config_error(tmp_path, cache, capfd):
    result = cli_in_process(capfd, tmp_path / "run", "optimizer@model.optimizer=sgdx", cache=cache)
    assert result.returncode != 0 and "sgdx" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_fork", "fsdp"])
def test_two_process_training(tmp_path, cache, strategy):
    overrides = ["trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                 "checkpoint.every_n_steps=2", "validation.every_n_steps=0"]
    if strategy == "fsdp":
        overrides = ["trainer=fsdp", *overrides]
    else:
        overrides = ["trainer=ddp", "trainer.strategy.start_method=fork", *overrides]  # the shipped DDP config
    result = run_cli(tmp_path / "run", *overrides, cache=cache)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "run"
    steps = losses(run / "logs" / "metrics.csv")
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    lora = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert lora and all(v.ndim == 2 for v in lora.values())  # gathered full tensors, not shards
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and all("lora_" in k for k in state["state_dict"])


@pytest.mark.slow
def test_resume_after_the_process_was_killed(tmp_path, cache, capfd):
    """SIGKILL a CLI run once its step-4 checkpoint exists, resume: the final LoRA equals an uninterrupted run's."""
    import signal
    import time

    common = ["trainer.max_steps=12", "checkpoint.every_n_steps=2", "validation.every_n_steps=0"]
    straight = cli_in_process(capfd, tmp_path / "straight", *common, cache=cache)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    cmd = cli_command("train", *FAST, f"hydra.run.dir={killed_dir}", *common)
    process = subprocess.Popen(cmd, env=cli_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "step-0000004.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its step-4 checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # checkpoint files appear complete (atomic rename); steps 5+ are lost
    process.wait()
    assert not (killed_dir / "lora" / "final").exists(), "the run finished before it was killed"

    resumed = cli_in_process(capfd, killed_dir, *common, "resume=true", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(killed_dir / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
