"""Loading FLUX pipelines (hub id, local directory or the offline tiny model) for training and inference.

`model.path` accepts a hub id (`black-forest-labs/FLUX.1-dev`), a local diffusers directory, or `tiny`
(the offline tiny FLUX, built on first use into the cache directory). Every failure to find the model is
reported as one `ModelNotFoundError` line naming the path and the config key, before diffusers starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY = "tiny"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `FluxPipeline.save_lora_weights` writes


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found or read."""


def cache_dir() -> Path:
    """Where built artefacts (tiny FLUX, synthetic shards, shapes models) are cached."""
    return Path(os.environ.get("REFLECTIONFLOW_CACHE", Path.home() / ".cache" / "reflectionflow"))


def resolve_model_path(path: str | os.PathLike, config_key: str = "model.path") -> str:
    """Return a local directory or hub id for `path`, failing early with one clear line if it is unusable."""
    path = str(path)
    if path == TINY:
        from reflectionflow.models.tiny import build_tiny_flux

        return str(build_tiny_flux(cache_dir() / "tiny-flux"))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{local} is not a diffusers pipeline directory (no model_index.json); set {config_key}=<dir or hub id>"
            )
        return str(local)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFoundError(f"model path {path!r} does not exist; set {config_key}=<dir or hub id>")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        # Only resolves (downloads if allowed) the pipeline index, so a wrong id fails before any weights load.
        snapshot_download(path, allow_patterns=["model_index.json"])
    except HFValidationError as err:
        raise ModelNotFoundError(f"invalid hub id {path!r} ({err}); set {config_key}=<dir or hub id>") from None
    except Exception as err:  # offline, gated, missing: huggingface_hub raises many types
        raise ModelNotFoundError(
            f"cannot fetch {path!r} from the hub ({type(err).__name__}); set {config_key}=<local dir> "
            "or log in / go online"
        ) from None
    return path


def resolve_lora_path(path: str | os.PathLike, config_key: str = "model.lora_path") -> str:
    """A LoRA directory (diffusers format) or a hub id, checked before any model loads."""
    local = Path(str(path)).expanduser()
    if local.is_dir():
        if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
            raise ModelNotFoundError(f"LoRA directory {local} holds no weights; set {config_key}=<dir>")
        for weights in local.glob("*.safetensors"):
            check_safetensors(weights, config_key)
        return str(local)
    if local.is_file():
        if local.suffix == ".safetensors":
            check_safetensors(local, config_key)
        return str(local)
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        return str(path)
    raise ModelNotFoundError(f"LoRA path {str(path)!r} does not exist; set {config_key}=<dir>")


def check_safetensors(path: Path, config_key: str) -> None:
    """Read the header of a safetensors file (cheap), so a damaged one fails in one line before any model
    loads."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ModelNotFoundError(
            f"{path} is not a readable safetensors file ({str(err)[:100]}); set {config_key}=<LoRA dir>"
        ) from None


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers' `from_pretrained` dtype keyword: `dtype` from 0.42 (huggingface/diffusers#14205, which
    deprecates `torch_dtype`), `torch_dtype` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def load_flux_pipeline(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    lora_path: str | os.PathLike | None = None,
    adapter_name: str = "reflection",
    config_key: str = "model.path",
    lora_weight_name: str = LORA_WEIGHT_NAME,
    text_encoders: bool = True,
):
    """Load a `FluxPipeline` (optionally with a LoRA adapter) from a hub id, a local directory or `tiny`.

    A LoRA given as a hub id is read from its `lora_weight_name` file: diffusers cannot guess the file
    name offline (`HF_HUB_OFFLINE`), even when the repository is cached. `text_encoders=False` leaves out
    CLIP, T5 and their tokenizers (training on precomputed embeddings)."""
    from diffusers import FluxPipeline

    from reflectionflow.console import hide_loading_bars

    hide_loading_bars()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    resolved = resolve_model_path(path, config_key)
    lora = resolve_lora_path(lora_path) if lora_path else None
    try:
        pipe = FluxPipeline.from_pretrained(resolved, **dtype_argument(dtype),
                                            **_without_text_encoders(text_encoders))
    except OSError as err:
        raise ModelNotFoundError(f"cannot read FLUX pipeline at {resolved!r}: {err}; set {config_key}=...") from None
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        weight_name = lora_weight_name if not Path(lora).exists() else None
        pipe.load_lora_weights(lora, weight_name=weight_name, adapter_name=adapter_name)
    return pipe.to(device)


def _without_text_encoders(text_encoders: bool) -> dict:
    """`from_pretrained` arguments that skip loading the text encoders and tokenizers."""
    if text_encoders:
        return {}
    return dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
