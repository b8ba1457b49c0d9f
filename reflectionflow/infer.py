"""`python -m reflectionflow.infer`: inference-time search over a prompt set (Hydra app, `conf/infer.yaml`).

Builds the search config, checks API keys and the prompt set, builds the API backends, then the generator
(the heavy part), and runs the search into the Hydra run directory. Anything a user can fix is reported
as one `error: ...` line before any model loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reflectionflow.models.loading import ModelNotFoundError
from reflectionflow.search.config import SearchConfig
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.errors import FatalAPIError, SetupError
from reflectionflow.search.prompts import PromptItem, shard, single_prompt
from reflectionflow.search.runner import run_search
from reflectionflow.search.secrets import check_api_keys

log = logging.getLogger(__name__)
USER_ERRORS = (SetupError, ModelNotFoundError, FatalAPIError)


def build(node: DictConfig, key: str) -> Any:
    """`instantiate(node)`, turning a user-fixable error inside the target into a one-line SetupError."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, USER_ERRORS + (ValueError,)):
            raise SetupError(f"{key}: {cause}") from None
        raise


def prompt_items(cfg: DictConfig) -> list[PromptItem]:
    """`prompt=...` (read literally, so it cannot interpolate environment variables) or the prompt set."""
    literal = OmegaConf.to_container(cfg, resolve=False)["prompt"]
    if literal is not None:
        return single_prompt(str(literal))
    return build(cfg.prompts, "prompts")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    search: SearchConfig = build(cfg.search, "search")
    roles = {"verifier": True, "reflector": search.reflects, "refiner": search.refines}
    needed = [name for name, used in roles.items() if used]
    check_api_keys({name: OmegaConf.to_container(cfg[name], resolve=True) for name in needed})
    items = prompt_items(cfg)
    shard(items, cfg.shard_index, cfg.num_shards)  # validates the shard before anything loads
    backends = {name: build(cfg[name], name) for name in needed}
    generator = build(cfg.generator, "generator")
    engine = SearchEngine(
        generator, backends["verifier"], search, backends.get("reflector"), backends.get("refiner")
    )
    summary = run_search(
        engine, items, run_dir, shard_index=cfg.shard_index, num_shards=cfg.num_shards, progress=cfg.progress
    )
    budget = summary["budget"]
    log.info(
        "%d prompts, mean score %s, %d images, %d NFE, %d verifier / %d reflector / %d refiner calls -> %s",
        summary["prompts"],
        summary["mean_score"],
        budget["images"],
        budget["nfe"],
        budget["verifier"]["calls"],
        budget["reflector"]["calls"],
        budget["refiner"]["calls"],
        run_dir,
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    return summary["mean_score"]


if __name__ == "__main__":
    main()
