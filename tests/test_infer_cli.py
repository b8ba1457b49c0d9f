"""`python -m reflectionflow.infer`'s command line (in this process; kill + resume in a real interpreter):
secrets, errors, hostile prompts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers.chat_server import ScriptedChatServer
from helpers.cli import ROOT, cli_command, cli_env, main_in_process, run_in_process
from hydra.utils import instantiate
from PIL import Image

from reflectionflow.search.config import SearchConfig, planned_cost

KEY = "sk-proj-RFTEST-5b1d9c0e7f-should-never-be-written"
DETERMINISTIC = [
    "generator=deterministic",
    "verifier=deterministic",
    "reflector=deterministic",
    "refiner=deterministic",
]


def infer(capfd, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI run in this process (`run_in_process`); `capfd`: pytest's fixture, for what it printed."""
    return run_in_process("infer", "progress=false", *overrides, capture=capfd, env=env)


def test_api_key_never_reaches_the_run_directory(tmp_path, capfd):
    run_dir = tmp_path / "run"
    with ScriptedChatServer(faults=["500", "malformed_content"]) as server:
        urls = [f"{role}.chat.base_url={server.base_url}" for role in ("verifier", "reflector", "refiner")]
        done = infer(
            capfd,
            "generator=deterministic",
            "search=reflectionflow",
            "search.width=2",
            "search.depth=1",
            "prompt=a photo of a red cat",
            f"hydra.run.dir={run_dir}",
            *urls,
            env={"OPENAI_API_KEY": KEY},
        )
        assert done.returncode == 0, done.stderr
        assert server.requests and all(r.authorization == f"Bearer {KEY}" for r in server.requests)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {".hydra", "00000"} <= {p.relative_to(run_dir).parts[0] for p in files}
    for path in files:
        data = path.read_bytes()
        assert KEY.encode() not in data and b"5b1d9c0e7f" not in data, path
    assert KEY not in done.stdout + done.stderr
    assert "OPENAI_API_KEY" in (run_dir / ".hydra" / "config.yaml").read_text()  # the name only


def test_missing_key_fails_at_start_with_one_line(tmp_path, capfd):
    done = infer(
        capfd,
        "search=noise",
        "verifier=openai",
        "weights.path=/nonexistent/flux",
        "generator=deterministic",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: environment variable OPENAI_API_KEY is not set (verifier.chat.api_key_env=OPENAI_API_KEY); "
        "export it, or set verifier.chat.api_key_env=null for a server that needs no key"
    ]
    assert not list((tmp_path / "run").glob("0*"))


def test_bad_prompt_file_and_shard_fail_with_one_line(tmp_path, capfd):
    done = infer(
        capfd,
        *DETERMINISTIC, "prompts=file", f"prompts.path={tmp_path / 'nope.txt'}", f"hydra.run.dir={tmp_path}"
    )
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith(
        "error: prompts: prompt file"
    )
    done = infer(capfd, *DETERMINISTIC, "shard_index=2", "num_shards=2", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0 and "shard_index" in done.stderr.strip().splitlines()[-1]


def unusable_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Overrides naming an input that cannot work, and what the error line must name."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(4096))
    reflecting = ["verifier=deterministic", "reflector=deterministic", "refiner=deterministic", "prompt=a cat"]
    return {
        "empty prompt file": ([*DETERMINISTIC, "prompts=file", f"prompts.path={empty}"], f"no prompts in {empty}"),
        # the LoRA is checked before the base model (here one that does not exist) is even looked at
        "LoRA of random bytes": (["generator=flux_tiny", "weights.path=/nonexistent/flux",
                                  f"weights.lora_path={lora}", *reflecting],
                                 f"{lora / 'pytorch_lora_weights.safetensors'} is not a readable safetensors file"),
        "weights for a generator without": ([*DETERMINISTIC, "prompt=a cat", "weights.path=/nonexistent/flux"],
                                            "weights.path=/nonexistent/flux: this generator loads no weights"),
    }


@pytest.mark.parametrize("case", ["empty prompt file", "LoRA of random bytes", "weights for a generator without"])
def test_unusable_input_fails_in_one_line_naming_it(tmp_path, case, capfd):
    overrides, message = unusable_inputs(tmp_path)[case]
    done = infer(capfd, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not list((tmp_path / "run").glob("0*"))


def test_hostile_cli_prompt_stays_inside(tmp_path, capfd):
    run_dir = tmp_path / "a" / "run"
    done = infer(
        capfd,
        *DETERMINISTIC,
        "search=noise",
        "search.width=2",
        "prompt='../../x ${oc.env:HOME}'",
        f"hydra.run.dir={run_dir}",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.parent == run_dir.parent) == ["run"]
    record = json.loads((run_dir / "00000" / "metadata.jsonl").read_text())
    assert record == {"prompt": "../../x ${oc.env:HOME}"}
    job = json.loads((run_dir / "result.json").read_text())["job"]
    assert job["prompt"] == "../../x ${oc.env:HOME}" and job["choices"]["prompts"] is None  # not the default set


def test_each_prompt_has_a_contact_sheet_of_its_search_and_the_run_one_result_file(tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red cat\ntwo blue cubes\n")
    run_dir = tmp_path / "run"
    done = infer(capfd, *DETERMINISTIC, "search=reflectionflow", "search.width=3", "search.depth=2", "prompts=file",
                 f"prompts.path={prompts}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    for index in (0, 1):
        search = json.loads((run_dir / f"{index:05d}" / "search.json").read_text())
        with Image.open(run_dir / f"{index:05d}" / "search.png") as sheet:
            text = sheet.text
        assert text["Rows"] == "chain 0 | chain 1 | chain 2"  # rows x columns = chains x (depth + 1)
        assert text["Columns"] == "round 0 (base) | round 1 | round 2"
        assert text["Title"].startswith(search["prompt"])
        captions = text["Description"].split("\n\n")
        assert len(captions) == 3 * (2 + 1)
        made = {(c["chain"], c["round"]): c for c in search["candidates"]}
        for k, caption in enumerate(captions):
            candidate = made[divmod(k, 3)]
            assert caption.startswith(f"score {candidate['score']['value']:.3f}")
            assert candidate["round"] == 0 or f"reflection: {candidate['reflection']}" in caption
        chain, round_ = search["selected"]["chain"], search["selected"]["round"]
        assert captions[3 * chain + round_].startswith(f"score {search['score']:.3f}  << selected")
        assert sum("<< selected" in caption for caption in captions) == 1
    assert (run_dir / "result.json").is_file() and not (run_dir / "summary.json").exists()


def test_presets_compose_and_match_budgets(compose_config):
    for preset, axes in {
        "noise": (True, False, False),
        "noise_prompt": (True, True, False),
        "reflectionflow": (True, True, True),
        "zero_order": (True, False, False),
    }.items():
        cfg = compose_config("infer", f"search={preset}", "verifier=vlm")
        search = instantiate(cfg.search)
        assert isinstance(search, SearchConfig)
        assert (search.axes.noise, search.axes.prompt, search.axes.reflection) == axes
        assert planned_cost(search)["images"] == 8
    cfg = compose_config("infer", "search=zero_order", "search.width=4", "search.axes.noise=true")
    assert instantiate(cfg.search).strategy == "zero_order"
    assert cfg.verifier.chat.api_key_env == "OPENAI_API_KEY"


def test_only_a_reflecting_search_needs_the_corrector(caplog, compose_config):
    from reflectionflow.infer import corrector_lora
    from reflectionflow.recipes import references

    noise = compose_config("infer", "experiment=shapes", "search=noise")
    reflecting = compose_config("infer", "search=reflectionflow", "weights.lora_path=/models/corrector")
    unset = compose_config("infer", "search=reflectionflow", "weights.lora_path=null")
    modelless = compose_config("infer", "search=reflectionflow", *DETERMINISTIC)
    corrector_lora(noise, reflects=False)
    assert noise.weights.lora_path is None and noise.generator.lora_path is None
    assert references(noise) == [("weights.path", "recipe://shapes_base")]  # no shapes_corrector recipe
    corrector_lora(reflecting, reflects=True)
    assert reflecting.generator.lora_path == "/models/corrector" and "no corrector LoRA" not in caplog.text
    corrector_lora(modelless, reflects=True)  # the deterministic generator takes no LoRA
    assert "no corrector LoRA" not in caplog.text
    corrector_lora(unset, reflects=True)
    assert "no corrector LoRA" in caplog.text


def strip_times(run_dir: Path) -> dict[str, object]:
    files = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts):
        if path.suffix == ".log":
            continue
        key = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.get("budget", {}).pop("seconds", None)
            files[key] = data
        else:
            files[key] = path.read_bytes()
    return files


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_outputs(tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of {n} cats\n" for n in range(8)))
    common = [
        *DETERMINISTIC,
        "search=reflectionflow",
        "prompts=file",
        f"prompts.path={prompts}",
        "generator.seconds_per_image=0.05",
    ]
    straight = infer(capfd, *common, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        cli_command("infer", "progress=false", *common, f"hydra.run.dir={killed_dir}"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(list(killed_dir.glob("*/search.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(killed_dir.glob("*/search.json")))
    assert 3 <= finished < 8

    resumed = infer(capfd, *common, f"hydra.run.dir={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert strip_times(killed_dir) == strip_times(tmp_path / "straight")


def files_but_hydras(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file with its mtime and bytes, except Hydra's saved config and log (Hydra writes them before
    the app starts)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, compose_config):
    """A copy of a finished reflectionflow run, resumed as `search=noise search.width=4`, reported its
    prompts finished and labelled their width-2 depth-3 records noise / width 4."""
    from reflectionflow.infer import run

    settings = [*DETERMINISTIC, "search=reflectionflow", "prompt=a photo of a red cat"]
    run(compose_config("infer", "progress=false", *settings), tmp_path / "run")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    before = files_but_hydras(copy)

    other = [*settings[:-2], "search=noise", "search.width=4", settings[-1], f"hydra.run.dir={copy}"]
    assert main_in_process("infer", "progress=false", *other) == (
        f"error: {copy} holds a run made with other settings (run.json differs in refiner, reflector, "
        "search.axes.prompt, search.axes.reflection, search.budget_width, search.depth, search.width); "
        "resume it with those, or write elsewhere (hydra.run.dir=<new directory>, a multirun: hydra.sweep.dir=)"
    )
    assert files_but_hydras(copy) == before

    resumed = compose_config("infer", "progress=false", *settings, "concurrent_prompts=2")  # speed only
    result = run(resumed, copy)
    assert (result["width"], result["depth"], result["prompts"]) == (2, 3, 1)
    assert result["search"]["axes"]["reflection"]
    assert files_but_hydras(copy)["00000/search.json"] == before["00000/search.json"]  # skipped, not redone


def test_a_run_directory_being_written_is_refused_naming_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {
        "host": socket.gethostname(),
        "pid": os.getppid(),  # alive, and not this process
        "started": "2026-01-02T03:04:05+0000",
        "shard": [0, 1],
    }
    (run_dir / "run.lock").write_text(json.dumps(holder))
    overrides = [*DETERMINISTIC, "search=noise", "prompt=a photo of a red cat", f"hydra.run.dir={run_dir}"]
    message = main_in_process("infer", "progress=false", *overrides)
    assert message == (
        f"error: {run_dir} is being written by pid {os.getppid()} on {socket.gethostname()} since "
        "2026-01-02T03:04:05+0000 (run.lock); wait for it to end or write elsewhere (hydra.run.dir=<new "
        f"directory>, a multirun: hydra.sweep.dir=); delete {run_dir / 'run.lock'} only if that process is gone"
    )
    assert json.loads((run_dir / "run.lock").read_text()) == holder
    assert not list(run_dir.glob("0*")) and not (run_dir / "run.json").exists()
