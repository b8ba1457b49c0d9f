"""The shapes world's corrector: reflection tuning on the shapes base model, exported with measured fix rates.

Training is `ReflectionTuningModule`'s (LoRA, corrector forward, flow matching). `export(dir)` writes the
LoRA in diffusers format to `dir/lora` (`python -m reflectionflow.infer weights.lora_path=<dir>/lora`) and
`dir/metrics.json`: on flawed renders of held-out prompts, the fraction of corrections the checker passes
under four inputs (ablations), next to the base model's fresh-sample accuracy on the same prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reflectionflow.models.lora import save_lora
from reflectionflow.models.module import ReflectionTuningModule
from reflectionflow.models.pipeline import ReflectionFluxPipeline
from reflectionflow.shapes.base import sample_accuracy
from reflectionflow.shapes.evaluation import cell_fidelity, edit_groups, judge, rates
from reflectionflow.shapes.triplets import heldout_flawed_cases
from reflectionflow.shapes.world import check_image, detect_scene
from reflectionflow.sheets import contact_sheet

log = logging.getLogger(__name__)

ABLATIONS = ("full", "no_reflection", "no_condition", "condition_only")
"""full: prompt + reflection + flawed image; no_reflection: T5 reads the prompt alone; no_condition: black
condition and the prompt alone (the training image drop); condition_only: T5 reads "" (the flawed image
and the pooled prompt alone, as the training text drop)."""


@torch.no_grad()
def corrector_fix_rates(
    pipe, cases: list, *, image_size: int, num_inference_steps: int, true_cfg_scale: float, seed: int
) -> tuple[dict[str, dict[str, Any]], Image.Image]:
    """Checker pass rate of the corrections of `cases` under each input of `ABLATIONS` (same noises):
    overall, per category, per edit type the reflection asks for and per number of edits, with the share of
    edited and of kept cells the correction gets right (`cell_fidelity`); and a sheet of the full-input
    corrections."""
    size = image_size
    prompts = [c.prompt for c in cases]
    flawed = [c.bad for c in cases]
    black = [Image.new("RGB", c.bad.size) for c in cases]
    inputs = {
        "full": dict(prompts=prompts, conditions=flawed, reflections=[c.reflection for c in cases]),
        "no_reflection": dict(prompts=prompts, conditions=flawed),
        "no_condition": dict(prompts=prompts, conditions=black),
        "condition_only": dict(prompts=[""] * len(cases), original_prompts=prompts, conditions=flawed),
    }
    noises = torch.stack([pipe.initial_noise(seed + i, size, size) for i in range(len(cases))])
    specs = [case.meta["spec"] for case in cases]
    kinds, counts = zip(*(edit_groups(case.reflection) for case in cases), strict=True)
    flawed_and_target = [(detect_scene(case.bad), detect_scene(case.good)) for case in cases]
    results = {}
    for name in ABLATIONS:
        images = pipe.generate(noises=noises, height=size, width=size, num_inference_steps=num_inference_steps,
                               true_cfg_scale=true_cfg_scale, **inputs[name])
        judged = judge(specs, lambda start, chunk, images=images: images, len(specs))
        verdicts = [j.correct for j in judged]
        if name == "full":
            sheet = corrections_sheet(cases, judged)
        cells = [cell_fidelity(*scenes, j.result.scene) for scenes, j in zip(flawed_and_target, judged, strict=True)]
        edited = [hit for case_edited, _ in cells for hit in case_edited]
        kept = [hit for _, case_kept in cells for hit in case_kept]
        results[name] = {
            "fix_rate": float(np.mean(verdicts)),
            "edited_cells": float(np.mean(edited)) if edited else float("nan"),
            "kept_cells": float(np.mean(kept)) if kept else float("nan"),
            "per_tag": rates(verdicts, [[spec.tag] for spec in specs]),
            "per_edit_type": rates(verdicts, kinds),
            "per_edit_count": rates(verdicts, [[count] for count in counts]),
        }
    return results, sheet


def corrections_sheet(cases: list, judged: list, per_category: int = 2):
    """Flawed | corrected | target of the first cases of each category, captioned with the reflection and
    the checker's verdict on the correction."""
    rows: dict[str, list] = {}
    for case, j in zip(cases, judged, strict=True):
        row = rows.setdefault(j.spec.tag, [])
        if len(row) < 3 * per_category:
            verdict = "fixed" if j.correct else "; ".join(j.result.messages())
            row += [(case.bad, f"flawed: {case.prompt.removeprefix('a photo of ')}"),
                    (j.image, f"corrected -- {verdict}"), (case.good, f"target: {case.reflection}")]
    return contact_sheet(list(rows.values()), cell=144, title="corrector: flawed | corrected | target",
                         row_labels=list(rows))


class ShapesCorrectorModule(ReflectionTuningModule):
    """`ReflectionTuningModule` + the recipe export (LoRA dir and held-out fix rates).

    Args beyond ReflectionTuningModule's:
        image_size: side of the evaluation images (the base model's).
        eval_per_category: held-out prompts per category, one flawed render each.
        eval_steps / eval_true_cfg_scale: sampling of corrections and of the base model's fresh samples.
        base_max_sequence_length: T5 length the base model was trained with (its fresh samples).
    """

    def __init__(
        self,
        image_size: int = 48,
        eval_per_category: int = 16,
        eval_steps: int = 20,
        eval_true_cfg_scale: float = 3.0,
        base_max_sequence_length: int = 16,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "stats"):
            stats = datamodule.stats()
            numbers = {f"data/{k}": float(v) for k, v in stats.items() if isinstance(v, int | float)}
            for group in ("by_source", "by_subset", "by_category"):
                numbers.update({f"data/{group}/{k}": float(v) for k, v in stats[group].items()})
            for logger in self.trainer.loggers:
                logger.log_metrics(numbers, step=0)

    @torch.no_grad()
    def export(self, path: Path) -> None:
        hp = self.hparams
        path.mkdir(parents=True, exist_ok=True)
        save_lora(self.transformer, path / "lora", self.corrector_settings(), state_dict=self.lora_state())
        self.pipe.to("cpu")
        self.transformer.eval()
        pipe = ReflectionFluxPipeline.with_settings(self.pipe, self.corrector_settings(), micro_batch=48)
        cases = heldout_flawed_cases(hp.eval_per_category, hp.image_size, hp.seed)
        metrics, sheet = corrector_fix_rates(
            pipe, cases, image_size=hp.image_size, num_inference_steps=hp.eval_steps,
            true_cfg_scale=hp.eval_true_cfg_scale, seed=hp.seed,
        )
        sheet.save(path / "corrections.png")
        metrics["already_correct"] = float(np.mean([check_image(c.bad, c.meta["spec"]).correct for c in cases]))
        metrics["base_model"], _ = sample_accuracy(
            self.pipe, hp.eval_per_category, hp.image_size, hp.eval_steps, hp.eval_true_cfg_scale,
            hp.base_max_sequence_length, seed=hp.seed,
        )
        metrics.update(global_step=self.global_step, eval_per_category=hp.eval_per_category,
                       steps=hp.eval_steps, true_cfg_scale=hp.eval_true_cfg_scale)
        log.info("corrector fix rates on held-out flawed renders: %s; base model fresh samples: %.1f%%",
                 {k: round(metrics[k]["fix_rate"], 3) for k in ABLATIONS}, 100 * metrics["base_model"]["accuracy"])
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
