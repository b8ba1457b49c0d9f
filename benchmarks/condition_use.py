"""Does the shapes corrector read its flawed image and its reflection, and which edits does it fix?

    python benchmarks/condition_use.py [--base DIR --lora DIR] [--cases N] [--fix-cases N]
        [--tags colors --flaws wrong_color] [--sheet corrections.png]

On held-out editing triplets (the good image is the flawed one with the reflection's edits), three tables
from `reflectionflow.models.diagnostics.condition_use` and the corrector's attention, then the fix rates:

1. condition: flow-matching loss with the real flawed image, another sample's (shuffled across the batch:
   the baseline, measured in the same run), a black one, and the loss of copying the flawed image; the
   same on the tokens the edit left unchanged (a corrector that edits copies those) and the edited ones;
2. reflection: T5 reads the prompt with its own reflection, another sample's, or the prompt alone;
3. attention: per block, the share of a target token's attention on the condition token at its own place
   (a copier puts most of it there), on an average other condition token, on all target and text tokens;
4. fix rate per edit type and per number of edits under the four corrector inputs (the recipe's metrics
   code, `shapes.corrector.corrector_fix_rates`), next to the base model's fresh samples.

Defaults: the `shapes_base` and `shapes_corrector` recipe products as the configs define them now, and the
corrector settings of `train experiment=shapes_corrector`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def recorded_attention() -> Iterator[list[torch.Tensor]]:
    """Head-averaged attention probabilities (B, queries, keys) of every joint attention call of the corrector
    (union mode: queries and keys are [text | target | condition]), recorded around its attention function."""
    from reflectionflow.models.corrector import attention

    attend, records = attention.attend, []

    def recording(query, key, value, processor):
        scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) / query.shape[-1] ** 0.5
        records.append(scores.softmax(-1).mean(1))
        return attend(query, key, value, processor)

    attention.attend = recording
    try:
        yield records
    finally:
        attention.attend = attend


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="base model dir (default: the shapes_base product)")
    parser.add_argument("--lora", help="corrector LoRA dir (default: the shapes_corrector product's lora/)")
    parser.add_argument("--cases", type=int, default=64, help="held-out triplets of the loss tables")
    parser.add_argument("--fix-cases", type=int, default=12, help="held-out flawed renders per category")
    parser.add_argument("--times", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--tags", nargs="+", help="only these prompt categories (a rung of the ladder)")
    parser.add_argument("--flaws", nargs="+", help="only these mistakes, e.g. wrong_color (see world.flaws)")
    parser.add_argument("--override", nargs="*", default=[], help="train config overrides of the corrector")
    parser.add_argument("--sheet", help="write flawed | corrected | target of the full-input corrections here (png)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from reflectionflow.config import compose
    from reflectionflow.models.callbacks import samples_batch
    from reflectionflow.models.diagnostics import condition_use
    from reflectionflow.models.loading import load_flux_pipeline
    from reflectionflow.models.pipeline import ReflectionFluxPipeline
    from reflectionflow.models.settings import CorrectorSettings
    from reflectionflow.recipes import built_product
    from reflectionflow.shapes.base import sample_accuracy
    from reflectionflow.shapes.corrector import ABLATIONS, corrector_fix_rates
    from reflectionflow.shapes.evaluation import EDIT_TYPES
    from reflectionflow.shapes.triplets import heldout_flawed_cases
    from reflectionflow.shapes.world import CATEGORIES

    cfg = compose("train", ["experiment=shapes_corrector", *args.override]).model
    base = args.base or str(built_product("shapes_base"))
    lora = args.lora or str(built_product("shapes_corrector") / "lora")
    size = 48
    settings = CorrectorSettings(base_model=base, rank=cfg.lora_rank, condition_size=size,
                                 condition_position=cfg.condition_position, attention=cfg.attention,
                                 lora_on_target=cfg.lora_on_target, max_sequence_length=cfg.max_sequence_length)
    flux = load_flux_pipeline(base, lora_path=lora)
    transformer = flux.transformer.eval()
    rung = dict(tags=args.tags, flaws=args.flaws)
    per_category = -(-args.cases // len(args.tags or CATEGORIES))
    cases = heldout_flawed_cases(per_category, size, seed=1, **rung)[: args.cases]
    batch = samples_batch([{"image": c.good, "condition": c.bad, "prompt": c.prompt, "reflection": c.reflection,
                            "t5_text": ""} for c in cases])
    print(f"{len(cases)} held-out editing triplets; base {base}; corrector {lora} ({settings})")
    results = condition_use(flux, transformer, batch, settings, args.times)
    f = "{:.4f}".format
    table("condition (T5 reads the prompt and the real reflection)",
          ["t", "real", "shuffled", "black", "copy", "real / shuffled", "unchanged: real", "copy", "black",
           "edited: real"],
          [[t, f(r["real"]), f(r["shuffled_condition"]), f(r["no_condition"]), f(r["copy"]),
            f"{r['condition_ratio']:.3f}x", f(r["real_unchanged"]), f(r["copy_unchanged"]),
            f(r["no_condition_unchanged"]), f(r["real_edited"])] for t, r in results.items()])
    table("reflection (the real condition)", ["t", "real", "shuffled", "prompt alone", "real / shuffled"],
          [[t, f(r["real"]), f(r["shuffled_reflection"]), f(r["prompt_only"]), f"{r['reflection_ratio']:.3f}x"]
           for t, r in results.items()])

    n_text, n_image = settings.max_sequence_length, 9
    rows = []
    for t in args.times:
        with recorded_attention() as records:
            condition_use(flux, transformer, batch, settings, [t])
        for block, probs in enumerate(records[: len(records) // 5]):  # the first of its five calls: real inputs
            queries = probs[:, n_text:n_text + n_image]
            on_condition = queries[:, :, n_text + n_image:]
            own = torch.diagonal(on_condition, dim1=1, dim2=2).mean().item()
            other = (on_condition.sum(-1).mean().item() - own) / (n_image - 1)
            rows.append([f"{t:g}", str(block), f"{own:.3f}", f"{other:.3f}",
                         f"{queries[:, :, n_text:n_text + n_image].sum(-1).mean().item():.3f}",
                         f"{queries[:, :, :n_text].sum(-1).mean().item():.3f}"])
    table(f"attention of target tokens (uniform share {1 / (n_text + 2 * n_image):.3f} per token)",
          ["t", "block", "own condition token", "other condition token", "all target", "all text"], rows)

    pipe = ReflectionFluxPipeline.with_settings(flux, settings, micro_batch=48)
    fix_cases = heldout_flawed_cases(args.fix_cases, size, seed=0, **rung)
    fixes, sheet = corrector_fix_rates(pipe, fix_cases, image_size=size, num_inference_steps=cfg.eval_steps,
                                   true_cfg_scale=cfg.eval_true_cfg_scale, seed=0)
    fresh, _ = sample_accuracy(flux, args.fix_cases, size, cfg.eval_steps, cfg.eval_true_cfg_scale,
                               compose("train", ["experiment=shapes_corrector"]).data.sample_max_sequence_length,
                               specs=[c.meta["spec"] for c in fix_cases])
    groups = [g for g in (*EDIT_TYPES, "1 edit", "2+ edits") if g in fixes["full"]["per_edit_type"]
              or g in fixes["full"]["per_edit_count"]]
    table(f"fix rate on {len(fix_cases)} held-out flawed renders (base model's fresh samples: "
          f"{fresh['accuracy']:.1%} on the same prompts)",
          ["corrector input", "all", *groups, "edited cells right", "kept cells right"],
          [[name, f"{fixes[name]['fix_rate']:.1%}",
            *(f"{(fixes[name]['per_edit_type'] | fixes[name]['per_edit_count']).get(g, float('nan')):.1%}"
              for g in groups), f"{fixes[name]['edited_cells']:.1%}", f"{fixes[name]['kept_cells']:.1%}"]
           for name in ABLATIONS])
    if args.sheet:
        sheet.save(args.sheet)
        print(f"corrections sheet: {args.sheet}")


if __name__ == "__main__":
    main()
