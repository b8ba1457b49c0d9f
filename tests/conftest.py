"""Test environment: one thread, offline hubs and W&B, a session-wide tiny FLUX pipeline."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """Directory of the offline tiny FLUX pipeline (built once per test session)."""
    from reflectionflow.models.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), seed=0)
