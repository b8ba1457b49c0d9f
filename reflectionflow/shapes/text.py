"""The shapes world's text encoder, pretrained before anything else and frozen afterwards, as FLUX's T5.

FLUX.1's T5-XXL is pretrained on general text and stays frozen while FLUX is trained and while the
corrector is reflection-tuned, so it already knows "change", "remove", "left", "top". This recipe gives
the miniature the same: a tiny T5 encoder learns the world's whole language — every prompt of every
category, detailed captions, the corrector's "{prompt} [Reflexion] {reflection}" texts and reflections
of every edit type in the reflector's own words — with a masked-language-model objective (15% of the
tokens hidden behind T5's sentinel `<extra_id_0>`, predicted through the tied embedding). Text is no
image: the held-out split is about which (prompt, image) pairs the base model sees, so held-out prompts
are sentences of the language like any other.

The CLIP text tower is pretrained the same way beside it (its pooled vector is the corrector's prompt).
The product (`export`) is the tokenizers and the encoders in diffusers-pipeline folder names (`tokenizer/`,
`tokenizer_2/`, `text_encoder/`, `text_encoder_2/`) and `metrics.json`: masked-token accuracy and a linear
probe on the frozen features of held-out reflections (edit type, the object's colour and shape before and
after, the cell), next to the same probe on an untrained encoder of the same shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from reflectionflow.data.transforms import t5_text
from reflectionflow.models.optim import build_optimizers
from reflectionflow.models.tiny import REFLECTION_WORDS, build_tokenizers, clip_text_encoder, t5_encoder
from reflectionflow.shapes.world import (
    CATEGORIES,
    all_specs,
    caption_spec,
    check_scene,
    make_flawed,
    plan_edits,
    reflection_text,
    sample_example,
    sample_scene,
)
from reflectionflow.shapes.world.edits import Add, Change, Edit, Move, Remove

log = logging.getLogger(__name__)

MASK_TOKEN = "<extra_id_0>"
KINDS = ("prompt", "caption", "reflection", "corrector")
"""What a sentence of the language is: a GenEval-style prompt, a detailed caption, a reflection, or the
corrector's T5 text (prompt + " [Reflexion] " + reflection)."""


def sample_reflection(rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, reflection) for a flawed version of a random training scene (every flaw kind, so every
    edit type), planned by the rule-based reflector on the structured scene."""
    while True:
        spec, scene = sample_example(rng)
        flawed, _ = make_flawed(spec, scene, rng)
        result = check_scene(flawed, spec)
        if result.correct:
            continue
        try:
            return spec.prompt, reflection_text(plan_edits(result, rng))
        except ValueError:  # a plan the reflector cannot name (rare): draw again
            continue


def sample_sentence(rng: np.random.Generator, kind: str) -> str:
    if kind == "prompt":
        specs = all_specs(str(rng.choice(CATEGORIES)))
        return specs[int(rng.integers(len(specs)))].prompt
    if kind == "caption":
        spec, _ = sample_example(rng)
        return caption_spec(sample_scene(spec, rng), rng).prompt
    prompt, reflection = sample_reflection(rng)
    return reflection if kind == "reflection" else t5_text(prompt, reflection)


def shapes_corpus(n: int = 600, seed: int = 12345) -> list[str]:
    """The tokenizers' vocabulary: every prompt of the world plus `n` sentences of each other kind, so
    every word the world uses is one T5 token (a prompt is at most 12, a caption at most 32)."""
    rng = np.random.default_rng(seed)
    prompts = [spec.prompt for tag in CATEGORIES for spec in all_specs(tag)]
    others = [sample_sentence(rng, kind) for kind in ("caption", "reflection") for _ in range(n)]
    return [*prompts, *others, REFLECTION_WORDS]


def shapes_tokenizers():
    """(CLIP, T5) tokenizers of the shapes language; T5 has one sentinel, the masked-LM's mask."""
    return build_tokenizers(shapes_corpus(), extra_ids=1)


class ShapesLanguage(IterableDataset):
    """Endless sentences of the world's language in the proportions `weights` (one per `KINDS`); a pure
    function of (seed, reader), each DDP rank x dataloader worker reading its own stream."""

    def __init__(self, weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25), seed: int = 0):
        if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"data.weights: one non-negative weight per kind {KINDS}, got {list(weights)}")
        self.weights = np.asarray(weights, dtype=float) / sum(weights)
        self.seed = seed

    def __iter__(self) -> Iterator[str]:
        rank, _, worker, workers = pytorch_worker_info()
        rng = np.random.default_rng([self.seed, rank * workers + worker])
        while True:
            yield sample_sentence(rng, KINDS[int(rng.choice(len(KINDS), p=self.weights))])


class ShapesLanguageDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 128, weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25), seed: int = 0):
        super().__init__()
        self.dataset = ShapesLanguage(tuple(weights), seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=0,
                          collate_fn=lambda texts: {"text": texts})


# ------------------------------------------------------------------------------------------------------
# What the frozen features know: a linear probe on reflections


def edit_labels(edit: Edit) -> dict[str, str]:
    """What one reflection sentence asks for, as probe labels: the edit type, the named object's colour
    and shape, the new colour and shape, the cell ('none' where the sentence names none)."""
    if isinstance(edit, Change):
        kind = "change_" + ("both" if edit.shape and edit.color else "shape" if edit.shape else "color")
        return {"edit": kind, "color": edit.target.color or "none", "shape": edit.target.shape or "none",
                "new_color": edit.color or "none", "new_shape": edit.shape or "none",
                "cell": str(edit.target.cell)}
    if isinstance(edit, Add):
        return {"edit": "add", "new_color": edit.color or "none", "new_shape": edit.shape, "cell": str(edit.cell)}
    if isinstance(edit, Remove):
        return {"edit": "remove", "color": edit.target.color or "none", "shape": edit.target.shape or "none",
                "cell": str(edit.target.cell)}
    assert isinstance(edit, Move)
    return {"edit": "move", "color": edit.target.color or "none", "shape": edit.target.shape or "none",
            "cell": str(edit.target.cell)}


def probe_set(n: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """`n` one-edit reflections with their labels."""
    from reflectionflow.shapes.world import parse_reflection

    rng = np.random.default_rng([seed, 7])
    found = []
    while len(found) < n:
        _, reflection = sample_reflection(rng)
        edits = parse_reflection(reflection)
        if len(edits) == 1:
            found.append((reflection, edit_labels(edits[0])))
    return found


@torch.no_grad()
def pooled_features(encoder, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean of the frozen encoder's token outputs over each text's tokens (padding excluded)."""
    batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.enable_grad()  # also when called from a no-grad export
def linear_probe(features: torch.Tensor, labels: list[str], train: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression from `features` to `labels` (first `train` rows fit it)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = (features - features[:train].mean(0)) / features[:train].std(0).clamp_min(1e-6)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(x[:train]), y[:train]).backward()
        optimizer.step()
    return float((head(x[train:]).argmax(1) == y[train:]).float().mean())


def probe_accuracies(
    features_of: Callable[[list[str]], torch.Tensor], n: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per label: probe accuracy on held-out reflections (a quarter of `n`), the majority-class rate, and
    how many reflections carry the label."""
    examples = probe_set(n, seed)
    features = features_of([text for text, _ in examples])
    train = 3 * n // 4
    results = {}
    for name in ("edit", "color", "shape", "new_color", "new_shape", "cell"):
        rows = [i for i, (_, labels) in enumerate(examples) if name in labels]  # ascending: training rows first
        first_test = sum(i < train for i in rows)
        labels = [examples[i][1][name] for i in rows]
        test = labels[first_test:]
        majority = max(test.count(label) for label in set(test)) / len(test)
        results[name] = {"probe": linear_probe(features[rows], labels, first_test), "majority": majority,
                         "examples": len(rows)}
    return results


# ------------------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class MaskedLM:
    """One encoder's masked-LM task: its tokenizer, mask token and first word id (random replacements are
    words, never special tokens)."""

    encoder: torch.nn.Module
    tokenizer: Any
    mask_id: int
    first_word_id: int

    def masked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, fraction: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input ids, labels with -100 where nothing is predicted): padding and special tokens stay."""
        special = torch.tensor(self.tokenizer.all_special_ids, device=input_ids.device)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
        draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        chosen = maskable & (draws < fraction)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        random_ids = torch.randint(self.first_word_id, self.mask_id, input_ids.shape, generator=generator,
                                   device=input_ids.device)
        masked = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, self.mask_id), input_ids)
        masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
        return masked, labels

    def loss(self, texts: list[str], length: int, fraction: float, generator: torch.Generator):
        """(cross-entropy, accuracy) on the masked tokens of `texts`, through the tied embedding as LM head."""
        device = self.encoder.device
        batch = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").to(device)
        masked, labels = self.masked(batch.input_ids, batch.attention_mask, fraction, generator)
        hidden = self.encoder(input_ids=masked, attention_mask=batch.attention_mask).last_hidden_state
        logits = hidden @ self.encoder.get_input_embeddings().weight.T
        picked = labels != -100
        loss = F.cross_entropy(logits[picked], labels[picked])
        return loss, (logits[picked].argmax(-1) == labels[picked]).float().mean()


class TextEncoderModule(L.LightningModule):
    """Masked-LM pretraining of the tiny T5 encoder and the CLIP text tower on the shapes language.

    Both are frozen afterwards, as FLUX's: the base model then cannot tailor CLIP's pooled vector into a
    private code for its prompts, and reads their detail from T5's tokens as FLUX does (which is where a
    reflection reaches the corrector). CLIP's causal attention makes its masked-LM a left-to-right one.

    Args:
        t5: T5 encoder sizes (d_model, d_kv, d_ff, num_layers, num_heads, relative_attention_num_buckets).
        clip: CLIP text tower sizes (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            projection_dim).
        mask_fraction: tokens masked per sentence (BERT's split: 80% mask token, 10% random, 10% kept).
        max_sequence_length: padded length of every text (the longest caption is 32 tokens).
        probe_examples: reflections of the probe at export (a quarter held out).
    """

    def __init__(
        self,
        t5: dict,
        clip: dict,
        mask_fraction: float = 0.15,
        max_sequence_length: int = 40,
        probe_examples: int = 2000,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.clip_tokenizer, self.tokenizer = shapes_tokenizers()
        torch.manual_seed(seed)
        self.encoder = t5_encoder(self.tokenizer, **t5)
        self.clip_encoder = clip_text_encoder(self.clip_tokenizer, **clip)
        self.tasks = {
            "t5": MaskedLM(self.encoder, self.tokenizer, self.tokenizer.convert_tokens_to_ids(MASK_TOKEN), 3),
            "clip": MaskedLM(self.clip_encoder, self.clip_tokenizer, self.clip_tokenizer.mask_token_id, 2),
        }

    def configure_optimizers(self):
        return build_optimizers(self.parameters(), self.optimizer_factory, self.lr_scheduler_factory, 1e-3)

    def mlm_losses(self, texts: list[str], generator: torch.Generator) -> dict[str, tuple[torch.Tensor, ...]]:
        hp = self.hparams
        return {name: task.loss(texts, hp.max_sequence_length, hp.mask_fraction, generator)
                for name, task in self.tasks.items()}

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        texts = batch["text"]
        losses = self.mlm_losses(texts, generator)
        for name, (loss, accuracy) in losses.items():
            self.log(f"train/{name}_loss", loss, batch_size=len(texts))
            self.log(f"train/{name}_masked_accuracy", accuracy, batch_size=len(texts))
        total = sum(loss for loss, _ in losses.values())
        self.log("train/loss", total, prog_bar=True, batch_size=len(texts))
        return total

    def probe(self, encoder) -> dict[str, dict[str, float]]:
        length = self.hparams.max_sequence_length
        return probe_accuracies(lambda texts: pooled_features(encoder, self.tokenizer, texts, length),
                                self.hparams.probe_examples, self.hparams.seed)

    @torch.no_grad()
    def export(self, path: Path) -> None:
        """Tokenizers and encoders in pipeline folder names, and metrics.json (masked accuracy, probes)."""
        hp = self.hparams
        self.to("cpu").eval()
        path.mkdir(parents=True, exist_ok=True)
        self.clip_tokenizer.save_pretrained(path / "tokenizer")
        self.tokenizer.save_pretrained(path / "tokenizer_2")
        self.clip_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.encoder.save_pretrained(path / "text_encoder_2", safe_serialization=True)
        held_out = [sample_sentence(np.random.default_rng([hp.seed, 9, i]), KINDS[i % len(KINDS)])
                    for i in range(512)]
        losses = self.mlm_losses(held_out, torch.Generator().manual_seed(hp.seed + 1))
        torch.manual_seed(hp.seed + 1)
        untrained = t5_encoder(self.tokenizer, **dict(hp.t5)).eval()
        metrics = {
            "global_step": self.global_step,
            "masked_loss": float(losses["t5"][0]),
            "masked_accuracy": float(losses["t5"][1]),
            "clip_masked_loss": float(losses["clip"][0]),
            "clip_masked_accuracy": float(losses["clip"][1]),
            "probe": self.probe(self.encoder),
            "probe_untrained": self.probe(untrained),
        }
        log.info("text encoders: masked-token accuracy T5 %.3f, CLIP %.3f; probe %s (untrained %s)",
                 metrics["masked_accuracy"], metrics["clip_masked_accuracy"],
                 {k: round(v["probe"], 3) for k, v in metrics["probe"].items()},
                 {k: round(v["probe"], 3) for k, v in metrics["probe_untrained"].items()})
        (path / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_text_encoders(path: str | Path) -> dict[str, Any]:
    """The frozen tokenizers and encoders of a `shapes_text` product, by FluxPipeline component name."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    path = Path(path)
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer"),
        "tokenizer_2": T5Tokenizer.from_pretrained(path / "tokenizer_2"),
        "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder").requires_grad_(False).eval(),
        "text_encoder_2": T5EncoderModel.from_pretrained(path / "text_encoder_2").requires_grad_(False).eval(),
    }
