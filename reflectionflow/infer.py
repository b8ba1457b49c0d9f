"""`python -m reflectionflow.infer`: inference-time search over a prompt set (`reflectionflow/conf/infer/`).

Builds the search config, checks API keys and the prompt set, builds the API backends, then the generator
(the heavy part), and runs the search into the Hydra run directory. Anything a user can fix is reported
as one `error: ...` line before any model loads. The job ends with its result file (`result.json`, see
`reflectionflow.search.result_file`), which sweeps aggregate; `wandb.enabled=true` logs the job to W&B.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from reflectionflow.config import (
    ConfigError,
    check_secret_interpolations,
    check_top_level_keys,
    redact_overrides,
    redact_secrets,
)
from reflectionflow.console import quiet_third_party, shown_path
from reflectionflow.models.loading import ModelNotFoundError, resolve_lora_path, resolve_model_path
from reflectionflow.recipes import RecipeError, resolve_references
from reflectionflow.search.config import SearchConfig
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.errors import FatalAPIError, SetupError
from reflectionflow.search.prompts import PromptItem, shard, single_prompt
from reflectionflow.search.result_file import assess, job_result, nested_outcomes, read_budget, write_result
from reflectionflow.search.run_dir import SHEET_FILE, record_run, run_lock, shard_suffix
from reflectionflow.search.runner import run_search
from reflectionflow.search.secrets import check_api_keys
from reflectionflow.search.sharding import resolve_shard, shard_suffix_resolver, sharding_environment
from reflectionflow.search.wandb_logging import JobTracker, WandbSettings

log = logging.getLogger(__name__)
USER_ERRORS = (SetupError, ConfigError, ModelNotFoundError, FatalAPIError, RecipeError)
# Hydra's per-job files (`hydra.output_subdir`, the job log) carry the shard suffix, so that shards sharing
# a run directory never write the same file (conf/infer.yaml).
OmegaConf.register_new_resolver("rf.shard_suffix", shard_suffix_resolver, replace=True)
# Settings of how fast or where a run works, never of what it finds: a resume may change them (run.json
# leaves them out), like everything outside the search, generator, called backends and prompt set
# (concurrent_prompts, sharding, progress, wandb, checker: the result is re-assessed every job).
SPEED_KEYS = frozenset(
    {"micro_batch", "text_cache_size", "cpu_offload", "compile", "device", "device_map", "seconds_per_image"}
    | {"max_concurrency", "max_retries", "timeout", "api_key_env"}
)


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


def corrector_lora(cfg: DictConfig, reflects: bool) -> None:
    """A search without reflection rounds never calls the corrector, so its LoRA is neither resolved nor
    loaded (`recipe://shapes_corrector` is not trained for a noise-only preset); a reflecting search
    whose generator takes a LoRA but has none gets a warning. Keys are looked up with `node.keys()`:
    `key in node` would resolve the value."""
    if not reflects:
        for node in (cfg.get("weights"), cfg.generator):
            if node is not None and "lora_path" in node.keys():
                node.lora_path = None
    elif "lora_path" in cfg.generator.keys() and cfg.generator.lora_path is None:
        log.warning(
            "no corrector LoRA (weights.lora_path=null): reflection rounds run the base model with an "
            "untrained condition stream; set weights.lora_path to a reflection-tuned LoRA directory"
        )


def check_weights(cfg: DictConfig, overrides: list[str]) -> None:
    """The generator's LoRA and model exist (hub ids resolve), before anything heavy: missing recipe
    products (`recipe://...`) are trained first, each announced in one line. Weights set on the command
    line for a generator that loads none fail rather than being ignored."""
    resolve_references(cfg)
    if "model_path" not in cfg.generator.keys():  # a generator without weights (deterministic)
        ignored = [o for o in overrides if o.lstrip("+~").startswith("weights.")]
        if ignored:
            raise SetupError(f"{ignored[0]}: this generator loads no weights; use generator=flux or flux_tiny")
        return
    if cfg.generator.get("lora_path"):
        resolve_lora_path(cfg.generator.lora_path, "weights.lora_path")
    resolve_model_path(cfg.generator.model_path, "weights.path")


def _without(node: Any, keys: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _without(v, keys) for k, v in node.items() if k not in keys}
    return node


def made_with(cfg: DictConfig, search: SearchConfig, roles: list[str]) -> dict[str, Any]:
    """What the run directory's search records depend on (its run.json): the search, the generator with
    its weights, the backends the search calls (`roles`), the prompt set; secrets redacted, SPEED_KEYS
    left out."""
    literal = OmegaConf.to_container(cfg, resolve=False)["prompt"]
    nodes = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("generator", *roles)}
    prompts = None if literal is not None else OmegaConf.to_container(cfg.prompts, resolve=True)
    made = {"search": search.to_dict(), **nodes, "prompts": prompts}
    made["prompt"] = None if literal is None else str(literal)
    return redact_secrets(_without(made, SPEED_KEYS))


def loggable_config(cfg: DictConfig) -> dict[str, Any]:
    """The job config resolved, except `prompt`, kept literally (its text may look like `${...}`)."""
    literal = OmegaConf.to_container(cfg, resolve=False)["prompt"]
    resolved = copy.deepcopy(cfg)
    with open_dict(resolved):
        resolved.prompt = None
    container = OmegaConf.to_container(resolved, resolve=True)
    container["prompt"] = literal
    return container


def describe_job(cfg: DictConfig, hydra_cfg: DictConfig | None) -> dict[str, Any]:
    """What produced a result: the preset and the other config choices, and the command-line overrides.
    With `prompt=...` the prompt set is that one prompt (`choices.prompts` null, `prompt` its text), not
    the `prompts` group's default."""
    choices = {} if hydra_cfg is None else OmegaConf.to_container(hydra_cfg.runtime.choices)
    overrides = [] if hydra_cfg is None else OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    literal = OmegaConf.to_container(cfg, resolve=False)["prompt"]
    if literal is not None and "prompts" in choices:
        choices["prompts"] = None
    return {
        "preset": choices.get("search"),
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra/")},
        "overrides": redact_overrides(overrides),
        "prompt": None if literal is None else str(literal),
    }


def start_tracker(
    cfg: DictConfig, hydra_cfg: DictConfig | None, run_dir: Path, job: dict[str, Any], extra: dict[str, Any]
) -> JobTracker:
    """The job's W&B run, named `[<job num>-]<preset>-w<width>-d<depth>[-b<budget>][<shard suffix>]` and
    grouped by sweep (shards of a single run: by their run directory)."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.wandb, resolve=True).items() if k != "enabled"}
    search, shard_info = extra["search"], extra["shard"]
    suffix = shard_suffix(shard_info["index"], shard_info["count"])
    name = f"{job['preset']}-w{search['width']}-d{search['depth']}"
    name += ("" if search["budget"] is None else f"-b{search['budget']}") + suffix
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        group, name = Path(hydra_cfg.sweep.dir).name, f"{hydra_cfg.job.num}-{name}"
    else:
        group = run_dir.name if suffix else None
    settings["group"] = settings["group"] or group
    config = loggable_config(cfg) | {"job": job | extra}
    return JobTracker(WandbSettings(**settings), name=name, config=config, run_dir=run_dir)


def run(cfg: DictConfig, run_dir: Path, hydra_cfg: DictConfig | None = None) -> dict[str, Any]:
    """Search this job's prompts into `run_dir` and write its result file; returns the result."""
    started = time.perf_counter()
    check_secret_interpolations(cfg, literal=("prompt",))
    check_top_level_keys(cfg, "infer")
    search: SearchConfig = build(cfg.search, "search")
    corrector_lora(cfg, search.reflects)
    concurrency = cfg.concurrent_prompts
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise SetupError(f"concurrent_prompts must be a positive int, got {concurrency!r}")
    roles = {"verifier": True, "reflector": search.reflects, "refiner": search.refines}
    needed = [name for name, used in roles.items() if used]
    keyed = needed + (["checker"] if cfg.get("checker") is not None else [])
    check_api_keys({name: OmegaConf.to_container(cfg[name], resolve=True) for name in keyed})
    shard_index, num_shards = resolve_shard(cfg.shard_index, cfg.num_shards, sharding_environment())
    items = prompt_items(cfg)
    mine = [item.index for item in shard(items, shard_index, num_shards)]
    record_run(run_dir, made_with(cfg, search, needed))
    checker = build(cfg.checker, "checker") if cfg.get("checker") is not None else None
    backends = {name: build(cfg[name], name) for name in needed}
    job = describe_job(cfg, hydra_cfg)
    check_weights(cfg, job["overrides"])
    extra = {"search": search.to_dict(), "shard": {"index": shard_index, "count": num_shards}}
    tracker = start_tracker(cfg, hydra_cfg, run_dir, job, extra) if cfg.wandb.enabled else None
    try:
        generator = build(cfg.generator, "generator")
        engine = SearchEngine(
            generator, backends["verifier"], search, backends.get("reflector"), backends.get("refiner")
        )
        searching = time.perf_counter()
        run_search(
            engine,
            items,
            run_dir,
            shard_index=shard_index,
            num_shards=num_shards,
            progress=cfg.progress,
            on_prompt=None if tracker is None else tracker.log_prompt,
            concurrency=concurrency,
        )
        assessing = time.perf_counter()
        outcomes = assess(run_dir, mine, checker)
        nested = nested_outcomes(run_dir, mine, search, checker) if search.budgets is not None else None
        finished = time.perf_counter()
        described = {
            "job": job,
            "shard": extra["shard"],
            "job_seconds": {"setup": searching - started, "search": assessing - searching,
                            "assess": finished - assessing, "total": finished - started},
            "wandb": None if tracker is None else tracker.describe(),
        }
        budgets = None if nested is None else [
            job_result(search=sub.to_dict(), outcomes=sub_outcomes, budget=spent, **described)
            for sub, sub_outcomes, spent in nested
        ]
        result = job_result(search=extra["search"], outcomes=outcomes, budget=read_budget(run_dir, mine),
                            budgets=budgets, **described)
        path = write_result(run_dir, result, shard_suffix(shard_index, num_shards))
        if tracker is not None:
            tracker.log_result(run_dir, result)
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if tracker is not None:
        tracker.finish()
    log.info(closing_block(result, path))
    return result


def _rounded(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def closing_block(result: dict[str, Any], path: Path) -> str:
    """The job's last console lines: what it achieved and spent, and where its result and images are."""
    spent = result["budget"]
    calls = " / ".join(f"{spent[role]['calls']} {role}" for role in ("verifier", "reflector", "refiner"))
    prompts = f"{result['prompts']} prompt{'' if result['prompts'] == 1 else 's'}"
    lines = [
        f"{prompts}: mean score {_rounded(result['mean_score'], '.3f')}, "
        f"accuracy {_rounded(result['accuracy'], '.1%')}; {spent['images']} images, {spent['nfe']} NFE, {calls} calls",
    ]
    for nested in result.get("budgets") or []:
        score, accuracy = _rounded(nested["mean_score"], ".3f"), _rounded(nested["accuracy"], ".1%")
        lines.append(f"  budget {nested['search_budget']:<4} mean score {score}, accuracy {accuracy}")
    lines += [f"  result     {shown_path(path)}",
              f"  images     {shown_path(path.parent)}/<prompt>/: samples/0000.png (GenEval's layout), "
              f"{SHEET_FILE} (the search)"]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf/infer", config_name="infer")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        with run_lock(run_dir, *resolve_shard(cfg.shard_index, cfg.num_shards, sharding_environment())):
            result = run(cfg, run_dir, hydra_cfg)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    except MissingMandatoryValue as err:
        raise SystemExit(f"error: {err.full_key} must be set (it is ??? in the config)") from None
    return result["mean_score"]


if __name__ == "__main__":
    main()
