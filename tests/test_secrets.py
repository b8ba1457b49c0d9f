"""A key passed every way a user might (overrides, `api_key_env`, `${oc.env:...}`) never reaches a file:
the apps' command lines (run in this process) grep every file of the run directory, W&B's offline run
included."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_app
from helpers.cli import run_in_process

from reflectionflow.config import ConfigError
from reflectionflow.search.errors import SetupError

KEY = "sk-proj-RFTEST-3e8a61f0c4-never-written"
ENV = {"OPENAI_API_KEY": KEY}
OVERRIDES = [f"+paths.api_token={KEY}", f"+paths.hf_token={KEY}"]  # train's free `paths` node
INTERPOLATED = "${oc.env:OPENAI_API_KEY}"


def assert_key_absent(root: Path, done) -> None:
    """The key is in no file under `root` and not in the console output."""
    assert [p for p in root.rglob("*") if p.is_file() and b"3e8a61f0c4" in p.read_bytes()] == []
    assert "3e8a61f0c4" not in done.stdout + done.stderr


def assert_nowhere(run_dir: Path, done) -> None:
    """A finished run (its saved overrides and W&B run written) holds the key nowhere."""
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and list(
        run_dir.glob("wandb/offline-run-*/run-*.wandb")
    )
    assert_key_absent(run_dir, done)


def test_train_writes_no_key_given_as_overrides(tmp_path, tiny_flux_path, capfd):
    run_dir = tmp_path / "run"
    done = run_in_process(
        "train",
        "experiment=tiny",
        f"model.path={tiny_flux_path}",
        "trainer.max_steps=2",
        "model.lora_rank=4",
        "logger=wandb",
        "callbacks.validation=null",
        "callbacks.validation_metrics=null",
        *OVERRIDES,
        f"hydra.run.dir={run_dir}",
        capture=capfd,
        cache=tmp_path / "cache",
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "lora" / "final").is_dir()
    assert "+paths.api_token=<redacted>" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert_nowhere(run_dir, done)


def test_infer_writes_no_key_given_as_overrides_or_in_a_prompt(tmp_path, capfd):
    """The reflector and refiner are not used by a noise search: their key settings are only written."""
    run_dir = tmp_path / "run"
    done = run_in_process(
        "infer",
        "generator=deterministic",
        "verifier=deterministic",
        "search=noise",
        "progress=false",
        f"prompt={INTERPOLATED}",
        f"reflector.chat.api_key_env={KEY}",
        f"+refiner.chat.api_key={KEY}",
        "wandb.enabled=true",
        f"hydra.run.dir={run_dir}",
        capture=capfd,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "00000" / "metadata.jsonl").read_text().strip() == '{"prompt": "' + INTERPOLATED + '"}'
    assert_nowhere(run_dir, done)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([f"verifier.chat.api_key_env={KEY}"], "verifier.chat.api_key_env must name an environment variable"),
        (
            [f"+verifier.chat.api_key={KEY}"],
            "verifier.chat.api_key: API keys are read from the environment only",
        ),
        ([f"+verifier.note={INTERPOLATED}"], f"verifier.note: {INTERPOLATED} would write the secret"),
    ],
)
def test_infer_refuses_a_key_in_the_config(tmp_path, monkeypatch, overrides, message):
    from reflectionflow.infer import run

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cfg = compose_app("infer", "search=noise", "verifier=openai", "generator=deterministic", *overrides)
    with pytest.raises((SetupError, ConfigError)) as err:
        run(cfg, tmp_path)
    assert str(err.value).startswith(message) and "OPENAI_API_KEY" in str(err.value)
    assert "3e8a61f0c4" not in str(err.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("app", ["train", "infer"])
def test_a_refused_unknown_key_writes_no_secret(tmp_path, capfd, app):
    """`+api_token=<key>`: an unknown top-level key, refused in one line that names it, and the key is in
    no file of the refused run and not in its output."""
    run_dir = tmp_path / "run"
    done = run_in_process(app, "experiment=tiny", f"+api_token={KEY}", f"hydra.run.dir={run_dir}",
                          capture=capfd, cache=tmp_path / "cache", env=ENV)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown top-level config key 'api_token'" in errors[0], done.stderr[-2000:]
    assert_key_absent(tmp_path, done)


def test_train_refuses_an_interpolated_secret_before_loading(tmp_path, monkeypatch):
    from reflectionflow.train import train

    monkeypatch.setenv("HF_TOKEN", KEY)
    monkeypatch.setenv("REFLECTIONFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"^note: \$\{oc.env:HF_TOKEN\} would write the secret in HF_TOKEN"):
        train(
            compose_app("train", "experiment=tiny", "+note=${oc.env:HF_TOKEN}", f"paths.run_dir={tmp_path}")
        )
    assert not (tmp_path / "cache").exists()  # before the model was built
