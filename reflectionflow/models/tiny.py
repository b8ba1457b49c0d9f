"""Offline tiny FLUX.1 pipeline: the real architecture at toy size, built locally in about a second.

No model hub is reachable on CI machines, so tests, benchmarks and the embedded default run on this
pipeline. Every component is the one FLUX.1-dev uses (FluxTransformer2DModel with guidance embedding,
16-channel AutoencoderKL with 8x downsampling, CLIP + T5 encoders and their tokenizers,
FlowMatchEulerDiscreteScheduler with dynamic shifting); only the sizes are tiny. The tokenizers'
vocabularies are the words of the bundled GenEval prompts plus a reflection vocabulary, built by rule, so two
builds map text to the same ids.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from importlib import resources
from pathlib import Path

import torch

# Bumped when the same seed builds different files, so cached builds (model.path=tiny) are rebuilt.
_BUILD_VERSION = 3

# Words a reflection uses that GenEval prompts lack; they keep the tiny T5 vocabulary meaningful.
REFLECTION_WORDS = (
    "[Reflexion] change make add remove move replace the color shape to of a an one two three four left right "
    "above below top bottom bigger smaller circle square triangle sharper brighter darker background object "
    "count position sure should be is are and with on in"
)


SENTENCE_PUNCTUATION = ".,;:!?"
CLIP_MASK_TOKEN = "<|mask|>"


def _corpus() -> list[str]:
    text = resources.files("reflectionflow.assets").joinpath("geneval_metadata.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()] + [REFLECTION_WORDS]


def _words(line: str) -> list[str]:
    """The words of `line` without sentence punctuation, as T5's SentencePiece has "▁red" and "." but
    no "▁red.": the last word of a reflection ("Change the circle to red.") is then the prompt's token."""
    return [word for word in (w.rstrip(SENTENCE_PUNCTUATION) for w in line.split()) if word]


def _word_counts(corpus: list[str], lower: bool) -> list[tuple[str, int]]:
    """Words of `corpus` by descending count, ties alphabetical: a pure function of the text."""
    counts = Counter(word for line in corpus for word in _words(line.lower() if lower else line))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def build_tokenizers(corpus: list[str], extra_ids: int = 0):
    """A byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer whose vocabularies are the words of
    `corpus`: every corpus word is one T5 token (sentence punctuation its own), any other text falls back
    to characters. `extra_ids` T5 sentinels (`<extra_id_0>`, ...) follow the vocabulary, as T5's do (its
    pretraining masks with them); with any, CLIP gets a `<|mask|>` token too, for masked-LM pretraining.
    CLIP's merges spell each word, but merges of more frequent words can win first ("green" -> g, re, e,
    n): distinct words stay distinct sequences, not always single tokens.

    Built by rule, not by the `tokenizers` trainers (whose merges and scores vary run to run), so the
    same corpus always gives the same token ids.
    """
    from transformers import CLIPTokenizer, T5Tokenizer

    words = _word_counts(corpus, lower=True)  # CLIP lower-cases its input
    byte_chars = sorted({c for word, _ in words for c in word} | set(string.ascii_lowercase + string.digits))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*byte_chars, *(c + "</w>" for c in byte_chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word, _ in words:  # left-to-right merges spell each word, ending in its end-of-word token
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces[1:]:
            pair = (pieces[0], piece)
            pieces[0] = pieces[0] + piece
            if pieces[0] not in vocab:
                vocab[pieces[0]] = len(vocab)
                merges.append(pair)
    if extra_ids:
        vocab[CLIP_MASK_TOKEN] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if extra_ids:
        clip.add_special_tokens({"mask_token": CLIP_MASK_TOKEN})

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    whole_words = [("\u2581" + word, math.log(count) - 1.0) for word, count in _word_counts(corpus, lower=False)]
    characters = [(c, -20.0) for c in [" ", "\u2581", *(chr(c) for c in range(33, 127))]]
    seen = {piece for piece, _ in whole_words}
    pieces = specials + whole_words + [(c, score) for c, score in characters if c not in seen]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=512)
    return clip, t5


def clip_text_encoder(tokenizer, **config):
    """A randomly initialised CLIP text encoder for `tokenizer` (sizes in `config`, CLIP's 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


def t5_encoder(tokenizer, **config):
    """A randomly initialised T5 encoder for `tokenizer` (sizes in `config`)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


def flux_dev_scheduler():
    """FLUX.1-dev's flow-matching Euler scheduler (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_components(seed: int = 0) -> dict:
    """The components of a tiny FLUX.1-dev-architecture pipeline, randomly initialised from `seed`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    clip_tok, t5_tok = build_tokenizers(_corpus())
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(
        clip_tok, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, projection_dim=32
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = t5_encoder(
        t5_tok, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8
    )
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
        "scheduler": flux_dev_scheduler(),
    }


def build_tiny_flux(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny FLUX pipeline in diffusers format to `path` (idempotent for the same seed).

    Loadable with `reflectionflow.models.loading.load_flux_pipeline(path)` and with plain
    `diffusers.FluxPipeline.from_pretrained(path)`.
    """
    from diffusers import FluxPipeline

    path = Path(path)
    marker = path / ".tiny_flux_seed"
    stamp = f"{seed} build {_BUILD_VERSION}"
    if marker.is_file() and marker.read_text() == stamp and (path / "model_index.json").is_file():
        return path
    pipe = FluxPipeline(**tiny_flux_components(seed))
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    marker.write_text(stamp)
    return path
