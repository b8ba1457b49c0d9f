"""`python -m reflectionflow.export push <lora dir> --repo <id>`: a trained corrector LoRA onto the Hugging
Face hub, with a model card.

The card is a README.md with YAML front matter, as diffusers' training scripts write it: base model,
library and tags, the training data; below it the LoRA's sampling settings (`reflectionflow.json`), the
run's training settings and its last validation sheet (`<run>/validation/step-*.png`), when the LoRA is a
training run's `lora/final` (or `--run` names the run). The token is read from `HF_TOKEN` only; `HF_ENDPOINT`
points huggingface_hub at a mirror.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from reflectionflow.models.loading import ModelNotFoundError, resolve_lora_path
from reflectionflow.models.settings import SETTINGS_FILE

HUB_DATASET = "hf://datasets/"
VALIDATION_FIGURE = "images/validation.png"
TAGS = ["text-to-image", "image-to-image", "diffusers", "lora", "flux", "reflectionflow"]
# FLUX.1-dev's licence, which its LoRAs carry on the hub (diffusers' FLUX training scripts write the same)
LICENCES = {
    "black-forest-labs/FLUX.1-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    }
}
# (label, key in the run's saved config) of the training settings the card lists
TRAINING_SETTINGS = [
    ("steps", "trainer.max_steps"),
    ("batch size per device", "data.batch_size"),
    ("devices", "trainer.devices"),
    ("nodes", "trainer.num_nodes"),
    ("gradient accumulation", "trainer.accumulate_grad_batches"),
    ("precision", "trainer.precision"),
    ("strategy", "trainer.strategy"),
    ("optimizer", "model.optimizer._target_"),
    ("learning rate", "model.optimizer.lr"),
    ("LoRA rank", "model.lora_rank"),
    ("LoRA targets", "model.lora_target_modules"),
    ("attention", "model.attention"),
    ("target size", "data.target_size"),
    ("condition size", "data.condition_size"),
    ("seed", "seed"),
]
DROPS = ("text", "image", "reflection")  # data.drop_<kind>


class ExportError(ValueError):
    """Something the user can fix: the message says what."""


def run_dir_of(lora_dir: Path) -> Path | None:
    """The training run a `<run>/lora/<name>` directory was saved by (it holds `.hydra/config.yaml`)."""
    run = lora_dir.resolve().parent.parent
    return run if (run / ".hydra" / "config.yaml").is_file() else None


def _setting(config, key: str) -> Any:
    value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def training_data(config) -> tuple[list[str], str]:
    """(hub datasets, a description) of the run's training shards."""
    shards = _setting(config, "data.shards")
    if isinstance(shards, dict):  # built by a function, e.g. the tiny run's synthetic shards
        return [], f"`{shards.get('_target_', 'generated')}` shards"
    patterns = [shards] if isinstance(shards, str) else list(shards or [])
    datasets = sorted(
        {"/".join(p.removeprefix(HUB_DATASET).split("/")[:2]) for p in patterns if p.startswith(HUB_DATASET)}
    )
    return datasets, ", ".join(f"`{p}`" for p in patterns)


def last_validation_sheet(run: Path) -> Path | None:
    sheets = sorted((run / "validation").glob("step-*.png"))
    return sheets[-1] if sheets else None


def model_card(lora_dir: Path, repo_id: str, run: Path | None) -> str:
    """The README.md of the pushed LoRA (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    settings = (
        json.loads((lora_dir / SETTINGS_FILE).read_text()) if (lora_dir / SETTINGS_FILE).is_file() else None
    )
    config = OmegaConf.load(run / ".hydra" / "config.yaml") if run is not None else None
    base = _setting(config, "model.path") if config is not None else None
    hub_base = base if isinstance(base, str) and base.count("/") == 1 and not Path(base).exists() else None
    datasets, data = training_data(config) if config is not None else ([], None)
    front = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        tags=TAGS,
        datasets=datasets or None,
        **LICENCES.get(hub_base, {}),
    )
    base_named = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{base}`"
    lines = [
        f"# {repo_id.split('/')[-1]}: a ReflectionFlow corrector LoRA",
        "",
        f"A reflection-tuned corrector LoRA for {base_named}: "
        "given a flawed image, its prompt and a reflection saying what to fix, FLUX generates the corrected "
        "image (*From Reflection to Perfection: Scaling Inference-Time Optimization for Text-to-Image "
        "Diffusion Models via Reflection Tuning*, ReflectionFlow, ICCV 2025). Trained with reflectionflow.",
        "",
        "## Use",
        "",
        "```python",
        "from reflectionflow.models.pipeline import ReflectionFluxPipeline",
        "",
        f'pipe = ReflectionFluxPipeline.from_pretrained("{hub_base or base}", lora_path="{repo_id}")',
        'images = pipe(["a photo of a red bench"], image=[flawed], reflection=["Make the bench red."])',
        "```",
        "",
        "The weights also load into a plain diffusers `FluxPipeline` (`pipe.load_lora_weights(...)`); the",
        "condition stream that reads the flawed image is reflectionflow's (`corrector_forward`).",
    ]
    if settings is not None:
        lines += [
            "",
            f"## Sampling settings (`{SETTINGS_FILE}`)",
            "",
            "```json",
            json.dumps(settings, indent=2),
            "```",
        ]
    if config is not None:
        lines += ["", "## Training", "", f"- data: {data}", f"- base model: `{base}`"]
        for label, key in TRAINING_SETTINGS:
            value = _setting(config, key)
            if value is not None:
                lines.append(f"- {label}: `{value}`")
        drops = [_setting(config, f"data.drop_{kind}") for kind in DROPS]
        if any(drop is not None for drop in drops):
            lines.append(f"- drops ({' / '.join(DROPS)}): `{' / '.join(str(drop) for drop in drops)}`")
        sheet = last_validation_sheet(run)
        if sheet is not None:
            lines += [
                "",
                "## Validation",
                "",
                f"Held-out samples at step {int(sheet.stem.removeprefix('step-'))}: flawed | corrected | "
                "target, captioned with their prompt and reflection.",
                "",
                f"![validation]({VALIDATION_FIGURE})",
            ]
    return str(ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def push(
    lora_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    run: str | os.PathLike | None = None,
    commit_message: str = "Upload a ReflectionFlow corrector LoRA",
) -> str:
    """Create `repo_id` (if missing) and upload the LoRA directory with its model card and figures;
    returns the commit's URL."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ExportError(
            "HF_TOKEN is not set: pushing to the hub needs a write token (export HF_TOKEN=hf_...)"
        )
    try:
        lora = Path(resolve_lora_path(lora_dir, "<lora dir>"))
    except ModelNotFoundError as err:
        raise ExportError(str(err)) from None
    if not lora.is_dir():
        raise ExportError(f"{lora} is not a LoRA directory (lora/final of a training run)")
    run_dir = Path(run) if run is not None else run_dir_of(lora)
    if run_dir is not None and not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ExportError(
            f"--run {run_dir}: no .hydra/config.yaml there, so it is not a training run directory"
        )
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        for path in lora.iterdir():
            if path.is_file():
                shutil.copy2(path, stage / path.name)
        (stage / "README.md").write_text(model_card(lora, repo_id, run_dir), encoding="utf-8")
        sheet = None if run_dir is None else last_validation_sheet(run_dir)
        if sheet is not None:
            (stage / VALIDATION_FIGURE).parent.mkdir()
            shutil.copy2(sheet, stage / VALIDATION_FIGURE)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=commit_message)
    return commit.commit_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reflectionflow.export", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("push", help="upload a LoRA directory with a model card to the hub")
    upload.add_argument("lora_dir", help="the LoRA directory, e.g. outputs/train/<run>/lora/final")
    upload.add_argument("--repo", required=True, help="the model repository, <user or org>/<name>")
    upload.add_argument("--private", action="store_true", help="create the repository private")
    upload.add_argument("--run", help="the training run directory (default: the one holding lora_dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        url = push(args.lora_dir, args.repo, private=args.private, run=args.run)
    except ExportError as err:
        sys.exit(f"error: {err}")
    print(f"pushed {args.lora_dir} to {args.repo}: {url}")


if __name__ == "__main__":
    main()
