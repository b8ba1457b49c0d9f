"""Test environment: one thread, offline hubs and W&B; the apps' real configs; a session-wide tiny FLUX."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from reflectionflow.config import compose  # noqa: E402

torch.set_num_threads(1)


def compose_app(app: str, *overrides: str, hydra_node: bool = False) -> DictConfig:
    """The config `python -m reflectionflow.<app> <overrides>` would run with (`hydra_node`: with the
    `hydra` node, e.g. the sweeper's params)."""
    return compose(app, overrides, hydra_node)


@pytest.fixture
def compose_config():
    """`compose_config(app, *overrides)`: an app's real composed config (as lightning-hydra-template's
    conftest provides); `app` is "train" or "infer"."""
    return compose_app


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """Directory of the offline tiny FLUX pipeline (built once per test session)."""
    from reflectionflow.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), seed=0)
