"""What a corrector LoRA was trained with, kept beside its weights as `reflectionflow.json`.

The corrector only works when it is sampled the way it was trained: the condition's size and RoPE
placement, the attention mode, whether the adapter also runs on text/target tokens, and the T5 length of
its "prompt [Reflexion] reflection" text. A mismatch (1024 px conditions, `aligned` vs `beside`, `causal`
vs `union`) does not fail, it silently degrades the corrections, so these travel with the LoRA: training
writes them (`save_lora`), and the pipeline and the search's generator read them (`resolve`), take them
as defaults and stop with one line on an explicit setting that contradicts them.

A LoRA directory without the file (the paper's released FLUX-Corrector, written by its trainer with
`FluxPipeline.save_lora_weights`) is taken to have the paper's settings (`PAPER_SETTINGS`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from reflectionflow.config import ConfigError, check_option
from reflectionflow.models.corrector import ATTENTION_MODES, CONDITION_POSITIONS

log = logging.getLogger(__name__)

SETTINGS_FILE = "reflectionflow.json"
PAPER_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
# The settings a sampler must match; `base_model` and `rank` describe the LoRA but are not sampling choices.
SAMPLING_FIELDS = ("condition_size", "condition_position", "attention", "lora_on_target", "max_sequence_length")


@dataclass(frozen=True)
class CorrectorSettings:
    """How a corrector LoRA was trained; the defaults are the paper's (`train_flux/config.yaml` and its
    inference scripts: 512 px conditions shifted beside the target, union attention, no adapter on
    text/target tokens, 512 T5 tokens, FLUX.1-dev).

    base_model: the FLUX pipeline the LoRA was trained on (hub id or the path training loaded).
    rank: the LoRA rank (None: unknown; the weights' shapes carry it anyway).
    condition_size: side in pixels the flawed image is resized to.
    condition_position: `beside` (the paper's RoPE shift) or `aligned` (the target's own ids).
    attention: `union` (the paper's) or `causal` (the condition attends only to itself).
    lora_on_target: whether the adapter also runs on text and target tokens (the paper's latent_lora).
    max_sequence_length: T5 tokens of the corrector's text.
    """

    base_model: str = PAPER_BASE_MODEL
    rank: int | None = None
    condition_size: int = 512
    condition_position: str = "beside"
    attention: str = "union"
    lora_on_target: bool = False
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        check_option("condition_position", self.condition_position, CONDITION_POSITIONS)
        check_option("attention", self.attention, ATTENTION_MODES)
        for name in ("condition_size", "max_sequence_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_SETTINGS = CorrectorSettings()


def write(settings: CorrectorSettings, lora_dir: str | os.PathLike) -> Path:
    """`<lora_dir>/reflectionflow.json`."""
    path = Path(lora_dir) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return path


def _settings_file(lora_path: str | os.PathLike) -> Path | None:
    """The settings file of a LoRA directory, weights file or hub id (None: it has none)."""
    local = Path(str(lora_path)).expanduser()
    if local.exists():
        path = (local if local.is_dir() else local.parent) / SETTINGS_FILE
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(lora_path), SETTINGS_FILE))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:  # offline and not cached: nothing to tell a missing file from
        log.warning("cannot look up %s in %s (offline); assuming the paper's settings", SETTINGS_FILE, lora_path)
        return None


def read(lora_path: str | os.PathLike) -> CorrectorSettings | None:
    """The settings a LoRA carries, or None when it carries none (then `PAPER_SETTINGS` apply)."""
    path = _settings_file(lora_path)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(CorrectorSettings)}
        return CorrectorSettings(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path} is not a valid corrector settings file ({err})") from None


def resolve(
    lora_path: str | os.PathLike | None,
    explicit: Mapping[str, Any],
    keys: Mapping[str, str] | None = None,
) -> CorrectorSettings:
    """The settings to sample `lora_path` with: the LoRA's, which `explicit` values (None = not set) may
    only repeat; a contradicting one is a ConfigError naming its config key (`keys[name]`, default the
    name). For a LoRA without a settings file, or no LoRA, the explicit values fill in the paper's."""
    given = {name: value for name, value in explicit.items() if value is not None}
    unknown = set(given) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"not corrector sampling settings: {sorted(unknown)}")
    carried = None if lora_path is None else read(lora_path)
    if carried is None:
        return replace(PAPER_SETTINGS, **given)
    for name, value in given.items():
        if value != getattr(carried, name):
            key = (keys or {}).get(name, name)
            raise ConfigError(
                f"{key}={value!r} contradicts the corrector LoRA {lora_path}, trained with {name}="
                f"{getattr(carried, name)!r} (its {SETTINGS_FILE}); drop the override"
            )
    return carried
