"""Does a corrector use its flawed image and its reflection? Flow-matching loss with real, shuffled and no inputs.

    python benchmarks/condition_use.py [--lora DIR] [--base DIR] [--shards DIR] [--position aligned]

On editing triplets (the good image is the flawed one with the reflection's edits) a corrector that reads
its condition predicts the target far better from the real flawed image than from another sample's.
The baseline is the same corrector with the conditions shuffled across the batch, measured in the same
run: a real/shuffled ratio near 1.0 means the condition is ignored. `copy` is the loss of predicting the
flawed image itself as the clean target (|x0 - condition|^2 / t^2): what merely copying would reach. The
second table does the same for the reflection text (T5 reads the prompt with its own reflection, another
sample's, or the prompt alone). The third shows where the target tokens' attention goes, per block: to
the condition token that stands for their own place (a copier puts nearly all of it there), to an average
other condition token, to all target and all text tokens. Defaults are the shapes recipes' latest
products in the cache (`python -m reflectionflow.train experiment=shapes_corrector`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def built_product(name: str) -> Path:
    from reflectionflow.recipes import latest_product, recipes_dir

    product = latest_product(name)
    if product is None:
        raise SystemExit(f"no {name} product in {recipes_dir()}: run python -m reflectionflow.train experiment={name}")
    return product


def latest_shards() -> str:
    from reflectionflow.recipes import recipes_dir

    built = sorted(recipes_dir().glob("shapes_triplets-*/stats.json"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise SystemExit("no shapes triplet shards: run python -m reflectionflow.train experiment=shapes_corrector")
    return str(built[-1].parent)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", help="corrector LoRA dir (default: the shapes_corrector product's lora/)")
    parser.add_argument("--base", help="base model dir (default: the shapes_base product)")
    parser.add_argument("--shards", help="triplet shard dir (default: the newest shapes_triplets-*)")
    parser.add_argument("--position", default="aligned", choices=["beside", "aligned"],
                        help="condition placement the LoRA was trained with")
    parser.add_argument("--lora-on-target", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA on target and text tokens too, as the shapes corrector trains")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-sequence-length", type=int, default=40)
    parser.add_argument("--times", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    args = parser.parse_args()
    torch.set_num_threads(2)

    from reflectionflow.data import GenRefDataModule
    from reflectionflow.data.transforms import t5_text
    from reflectionflow.models.corrector import condition_ids, corrector_forward, latent_ids
    from reflectionflow.models.loading import load_flux_pipeline
    from reflectionflow.models.pipeline import encode_images

    base = args.base or str(built_product("shapes_base"))
    lora = args.lora or str(built_product("shapes_corrector") / "lora")
    shards = args.shards or latest_shards()
    flux = load_flux_pipeline(base, lora_path=lora)
    transformer = flux.transformer.eval()
    datamodule = GenRefDataModule(f"{shards}/shapes-*.tar", batch_size=args.batch, num_workers=0, target_size=48,
                                  condition_size=48, resampled=False, shuffle_buffer=0,
                                  drop_text=0.0, drop_image=0.0, drop_reflection=0.0)
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)  # as Lightning: [-1, 1]
    editing = [i for i, subset in enumerate(batch["subset"]) if subset == "editing"]
    if len(editing) < 2:
        raise SystemExit(f"{shards}: fewer than 2 editing triplets in the first batch")

    scale = flux.vae_scale_factor
    size = batch["image"].shape[-1]
    prompts = [batch["prompt"][i] for i in editing]
    reflections = [batch["reflection"][i] for i in editing]
    texts = {
        "real": [t5_text(p, r) for p, r in zip(prompts, reflections, strict=True)],
        "shuffled": [t5_text(p, r) for p, r in zip(prompts, reflections[1:] + reflections[:1], strict=True)],
        "none": prompts,
    }
    with torch.no_grad():
        target = encode_images(flux.vae, batch["image"][editing])
        condition = encode_images(flux.vae, batch["condition"][editing])
        encoded = {name: flux.encode_prompt(prompt=prompts, prompt_2=t5, max_sequence_length=args.max_sequence_length)[:2]
                   for name, t5 in texts.items()}
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
        ids = dict(img_ids=latent_ids(size // scale, size // scale), txt_ids=torch.zeros(args.max_sequence_length, 3))
        cond_ids = condition_ids(size, vae_scale_factor=scale, position=args.position)
        copy_mse = ((target - condition) ** 2).mean().item()

        def loss(t_value: float, text: str, cond: torch.Tensor | None) -> float:
            t5, pooled = encoded[text]
            velocity = corrector_forward(
                transformer, hidden_states=(1 - t_value) * target + t_value * noise, encoder_hidden_states=t5,
                pooled_projections=pooled, timestep=torch.full((len(editing),), t_value), cond_hidden_states=cond,
                cond_ids=cond_ids if cond is not None else None, lora_on_target=args.lora_on_target, **ids,
            )
            return ((velocity - (noise - target)) ** 2).mean().item()

        print(f"{len(editing)} editing triplets from {shards}; corrector {lora} ({args.position})")
        print("condition (T5 reads the prompt and the real reflection):")
        print("   t | real condition | shuffled | none   | copy   | real / shuffled")
        for t in args.times:
            real, shuffled, none = (loss(t, "real", cond) for cond in (condition, condition.roll(1, 0), None))
            print(f"{t:4.1f} | {real:14.4f} | {shuffled:8.4f} | {none:6.4f} | {copy_mse / t**2:6.4f} | "
                  f"{real / shuffled:.3f}x")
        print("reflection (the real condition):")
        print("   t | real reflection | shuffled | prompt alone | real / shuffled")
        for t in args.times:
            real, shuffled, none = (loss(t, text, condition) for text in ("real", "shuffled", "none"))
            print(f"{t:4.1f} | {real:15.4f} | {shuffled:8.4f} | {none:12.4f} | {real / shuffled:.3f}x")
        n_text, n_image = args.max_sequence_length, target.shape[1]
        print("attention of target tokens (real inputs; a uniform share is "
              f"{1 / (n_text + 2 * n_image):.3f} per token):")
        print("   t | block | own condition token | other condition token | all target | all text")
        for t in args.times:
            with recorded_attention() as records:
                loss(t, "real", condition)
            for block, probs in enumerate(records):
                queries = probs[:, n_text:n_text + n_image]
                on_condition = queries[:, :, n_text + n_image:]
                own = torch.diagonal(on_condition, dim1=1, dim2=2).mean().item()
                other = (on_condition.sum(-1).mean().item() - own) / (n_image - 1)
                on_target = queries[:, :, n_text:n_text + n_image].sum(-1).mean().item()
                print(f"{t:4.1f} | {block:5d} | {own:19.3f} | {other:21.3f} | {on_target:10.3f} | "
                      f"{queries[:, :, :n_text].sum(-1).mean().item():8.3f}")

if __name__ == "__main__":
    main()
