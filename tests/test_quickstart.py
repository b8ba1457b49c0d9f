"""The README's quick start, command by command, as a new user runs it in an empty directory."""

from __future__ import annotations

import json
import re
import shlex

from helpers.cli import ROOT, run_cli

# What the apps printed before their consoles were quieted (reflectionflow/console.py): none may return.
NOISE = [
    r"^INFO: ",  # Lightning's own console handler: every Lightning line a second time
    "💡", "litlogger", "litmodels",  # Lightning's adverts
    "torch_dtype",  # diffusers' deprecation of our own keyword
    r"\w+Warning: ",  # any Python warning (FutureWarning: ..., UserWarning: ...)
    "requires torchvision",  # transformers' image-processor fallback
    "LeafSpec",  # torch's pytree deprecation inside Lightning
    "longer than the specified maximum sequence length",  # CLIP's 77 tokens, diffusers' probe
    "No LoRA keys associated",  # diffusers looking for text-encoder LoRA keys
    "Loading pipeline components", "Loading weights",  # loading bars
    r"Epoch \d+/-?\d+",  # Lightning's bar of one endless epoch
]


def noise_in(output: str) -> list[str]:
    """The lines of `output` (carriage-return updates split into lines) that match a NOISE pattern."""
    lines = output.replace("\r", "\n").splitlines()
    return [line for line in lines if any(re.search(pattern, line) for pattern in NOISE)]


def log_messages(output: str) -> list[str]:
    """The messages of the `[time][logger][LEVEL] - message` lines."""
    return re.findall(r"^\[[^]]+\]\[[^]]+\]\[[A-Z]+\] - (.*)$", output, re.M)


def quickstart_commands() -> list[list[str]]:
    """The `python -m reflectionflow.<app> ...` lines of the README's first quick-start code block."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("python -m reflectionflow."):
            commands.append(shlex.split(line))
    return commands


def test_the_quick_start_runs_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c[2] for c in commands] == ["reflectionflow.train", "reflectionflow.infer", "reflectionflow.infer"]
    printed = {}
    for command in commands:
        app = command[2].removeprefix("reflectionflow.")
        done = run_cli(app, *command[3:], cache=tmp_path / "cache", cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert not noise_in(done.stdout + done.stderr), (command, noise_in(done.stdout + done.stderr))
        messages = log_messages(done.stdout)
        assert len(messages) == len(set(messages)), messages  # each record printed once
        printed.setdefault(app, done.stdout + done.stderr)
    train, infer = printed["train"], printed["infer"]
    assert "train: 100%" in train and "| 60/60 [" in train  # optimizer steps of max_steps
    for line in ["trained 60 steps into outputs/train/tiny", "  LoRA       outputs/train/tiny/lora/final/",
                 "  checkpoint outputs/train/tiny/checkpoints/step-0000060.ckpt",
                 "  validation outputs/train/tiny/validation/", "  logs       outputs/train/tiny/logs/metrics.csv"]:
        assert line in train.splitlines() or line in "\n".join(log_messages(train)), (line, train[-2000:])
    assert re.search(r"1 prompt: mean score \d\.\d{3}, accuracy -; 8 images", infer), infer[-2000:]
    assert "  result     outputs/infer/tiny/result.json" in infer.splitlines()
    assert (tmp_path / "outputs/train/tiny/lora/final/pytorch_lora_weights.safetensors").is_file()
    search = json.loads((tmp_path / "outputs/infer/tiny/00000/search.json").read_text())
    assert len(search["candidates"]) == 2 * 4 and search["prompt"] == "a photo of a red bench"
    assert sum(c["reflection"] is not None for c in search["candidates"]) == 2 * 3  # reflection rounds
    (sweep,) = (tmp_path / "multirun/infer").iterdir()
    assert len(list(sweep.glob("*/result.json"))) == 4 and (sweep / "scaling.png").is_file()
