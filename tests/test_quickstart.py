"""The README's quick start, command by command, as a new user runs it in an empty directory."""

from __future__ import annotations

import json
import re
import shlex

from helpers.cli import ROOT, run_cli


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
    for command in commands:
        app = command[2].removeprefix("reflectionflow.")
        done = run_cli(app, *command[3:], cache=tmp_path / "cache", cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert (tmp_path / "outputs/train/tiny/lora/final/pytorch_lora_weights.safetensors").is_file()
    search = json.loads((tmp_path / "outputs/infer/tiny/00000/search.json").read_text())
    assert len(search["candidates"]) == 2 * 4 and search["prompt"] == "a photo of a red bench"
    assert sum(c["reflection"] is not None for c in search["candidates"]) == 2 * 3  # reflection rounds
    (sweep,) = (tmp_path / "multirun/infer").iterdir()
    assert len(list(sweep.glob("*/result.json"))) == 4 and (sweep / "scaling.png").is_file()
