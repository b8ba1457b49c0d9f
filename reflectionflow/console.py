"""The apps' console: each record printed once, and nothing a user can do nothing about.

Both apps call `quiet_third_party()` before anything else runs. Third-party warnings and log records that
we cannot fix at their source are dropped here by their exact message (the fixed part of it), one list
each, so every other warning still reaches the user. Lightning's own console handlers are taken off by
the shared Hydra logging config (`conf/shared/hydra/job_logging/reflectionflow.yaml`), which leaves one
handler, Hydra's, for every record.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

# (logger, the start of the message: its fixed text) of records that say nothing a user can act on
NOISY_RECORDS = (
    # adverts for Lightning's cloud services, printed by every Trainer
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging and experiment tracking"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud uploads and versioning"),
    # transformers without torchvision: diffusers' pipelines import image processors FLUX never uses
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed)"),
    ("transformers.utils.import_utils", "`SiglipImageProcessor` requires torchvision (not installed)"),
    # diffusers' encode_prompt tokenizes once untruncated to report what CLIP's 77 positions cut off
    (
        "transformers.tokenization_utils_base",
        "Token indices sequence length is longer than the specified maximum",
    ),
    # FluxPipeline.load_lora_weights looks for text-encoder LoRA keys, which a corrector LoRA never has
    (
        "diffusers.loaders.lora_base",
        "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'",
    ),
)
# (category, the start of the message) of warnings raised inside third-party code, not by our calls
NOISY_WARNINGS = (
    # Lightning's pytree helper builds torch's deprecated LeafSpec
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated"),
)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_third_party() -> None:
    """Install the filters of `NOISY_RECORDS` and `NOISY_WARNINGS` (once per process)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start in NOISY_RECORDS:
        by_logger[name] = by_logger.get(name, ()) + (start,)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
    for category, start in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)  # matched at the start


def hide_loading_bars() -> None:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars (carriage-return
    lines in every log, and the load takes a second); downloads from the hub keep their progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars = not are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # turns the hub's bars off too
    if hub_bars:
        enable_progress_bars()


def shown_path(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it is inside it: what a user types next."""
    relative = os.path.relpath(path)
    return Path(path).as_posix() if relative.startswith("..") else relative
