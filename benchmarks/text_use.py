"""Which text stream does the shapes base model read: T5's tokens or CLIP's pooled vector?

    python benchmarks/text_use.py [--base DIR] [--per-category N]

Held-out single-sample accuracy (the base recipe's metric, same noises) with the real texts (the baseline,
measured in the same run) and with one stream replaced: T5 reading "" or another prompt (the batch rolled
by half), the pooled vector of "" or of another prompt. FLUX reads a prompt's detail from T5; a corrector
hears its reflection through T5 only (CLIP keeps the original prompt), so a base model that draws from
the pooled vector alone leaves its corrector deaf to reflections.
"""

from __future__ import annotations

import argparse

import torch

VARIANTS = ("real", "empty_t5", "other_t5", "empty_pooled", "other_pooled")


def swapped_text_pipeline(variant: str):
    """`ReflectionFluxPipeline` whose conditional text embeddings have one stream replaced by `variant`."""
    from reflectionflow.models.pipeline import ReflectionFluxPipeline

    class SwappedText(ReflectionFluxPipeline):
        def encode_text(self, clip_texts, t5_texts, max_sequence_length=None):
            t5, pooled = super().encode_text(clip_texts, t5_texts, max_sequence_length)
            if variant == "real" or not any(t5_texts):  # the unconditional branch stays as it is
                return t5, pooled
            blank = [""] * len(t5_texts)
            if variant == "empty_t5":
                return super().encode_text(clip_texts, blank, max_sequence_length)[0], pooled
            if variant == "empty_pooled":
                return t5, super().encode_text(blank, t5_texts, max_sequence_length)[1]
            shift = max(1, len(t5_texts) // 2)
            return (t5.roll(shift, 0), pooled) if variant == "other_t5" else (t5, pooled.roll(shift, 0))

    return SwappedText


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="base model dir (default: the shapes_base product)")
    parser.add_argument("--per-category", type=int, default=16, help="held-out prompts per category")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=2.0)
    args = parser.parse_args()

    from reflectionflow.config import compose
    from reflectionflow.models.loading import load_flux_pipeline
    from reflectionflow.recipes import built_product
    from reflectionflow.shapes.evaluation import accuracy_by_category, judge
    from reflectionflow.shapes.world import heldout_eval_set

    base = args.base or str(built_product("shapes_base"))
    model = compose("train", ["experiment=shapes_base"]).model
    length, size = model.max_sequence_length, model.image_size
    flux = load_flux_pipeline(base)
    specs = heldout_eval_set(args.per_category, 1)
    print(f"{len(specs)} held-out prompts, {args.steps} steps, guidance {args.cfg}; base {base}")
    real = None
    for variant in VARIANTS:
        pipe = swapped_text_pipeline(variant)(flux, max_sequence_length=length)

        def samples(start, chunk, pipe=pipe):
            noises = torch.stack([pipe.initial_noise(1 + start + i, size, size) for i in range(len(chunk))])
            return pipe.generate([s.prompt for s in chunk], noises=noises, height=size, width=size,
                                 num_inference_steps=args.steps, true_cfg_scale=args.cfg)

        accuracy, per_tag = accuracy_by_category(judge(specs, samples, 48))
        if real is None:
            real = accuracy
            print("| texts | accuracy | vs real | " + " | ".join(per_tag) + " |")
            print("|" + "---|" * (3 + len(per_tag)))
        cells = " | ".join(f"{100 * v:.1f}" for v in per_tag.values())
        print(f"| {variant} | {100 * accuracy:.1f}% | {accuracy / real if real else float('nan'):.2f}x | {cells} |", flush=True)


if __name__ == "__main__":
    main()
