"""The shapes text encoder recipe and the world's language: tokens, captions, probes, frozen reuse."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_shapes_recipes import build_fast

from reflectionflow.shapes.text import (
    KINDS,
    TextEncoderModule,
    edit_labels,
    load_text_encoders,
    sample_sentence,
    shapes_tokenizers,
)
from reflectionflow.shapes.world import (
    CAPTION,
    PromptSpec,
    Scene,
    ShapeObject,
    caption_allowed,
    caption_spec,
    check_image,
    check_scene,
    parse_reflection,
    render_scene,
    sample_example,
    sample_scene,
    split_specs,
)


def test_a_reflections_closing_word_is_the_prompts_token():
    _, t5 = shapes_tokenizers()
    reflection = t5("Change the green circle to red.").input_ids
    assert t5.convert_ids_to_tokens(reflection)[-3:] == ["\u2581red", ".", "</s>"]
    assert reflection[-3] == t5("a photo of a red circle").input_ids[4]


def test_every_word_of_the_language_is_one_token():
    _, t5 = shapes_tokenizers()
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for _ in range(50):
            text = sample_sentence(rng, kind)
            pieces = t5.convert_ids_to_tokens(t5(text).input_ids)
            words = text.replace(".", " .").replace(",", " ,").split()
            assert len(pieces) == len(words) + 1, (text, pieces)  # + </s>


def test_a_captions_scene_passes_the_checker_and_a_changed_cell_fails():
    rng = np.random.default_rng(1)
    for _ in range(100):
        _, scene = sample_example(rng)
        spec = caption_spec(scene, rng)
        assert spec.tag == CAPTION and len(spec.include) == len(scene)
        assert check_image(render_scene(scene), spec).correct, spec.prompt
    circle = ShapeObject("circle", "red", 1 / 6, 1 / 6, 0.24)
    spec = caption_spec(Scene((circle,)))
    assert spec.prompt == "a photo of a red circle in the top left"
    moved = check_scene(Scene((circle.moved_to(0.5, 0.5),)), spec)
    assert [p.kind for p in moved.problems] == ["wrong_cell"] and moved.score < 1.0
    assert PromptSpec.from_geneval(spec.to_geneval()) == spec


def test_no_caption_describes_a_held_out_prompts_scene():
    rng = np.random.default_rng(2)
    held_out = [spec for tag in ("colors", "position", "color_attr") for spec in split_specs(tag, "test")[:5]]
    for spec in held_out:
        assert not caption_allowed(sample_scene(spec, rng)), spec.prompt
    for spec in split_specs("colors", "train"):  # one object: only a held-out colours prompt could match
        assert caption_allowed(sample_scene(spec, rng)), spec.prompt
    _, scene = sample_example(rng, tags=("counting",))
    assert caption_allowed(scene)  # three or four objects satisfy no held-out prompt


def test_probe_labels_say_what_a_sentence_asks():
    (edit,) = parse_reflection("Change the green circle to red.")
    assert edit_labels(edit) == {"edit": "change_color", "color": "green", "shape": "circle", "new_color": "red",
                                 "new_shape": "none", "cell": "None"}
    (edit,) = parse_reflection("Add one blue square on the right.")
    assert edit_labels(edit) == {"edit": "add", "new_color": "blue", "new_shape": "square", "cell": "(1, 2)"}


def test_text_recipe_trains_and_its_frozen_encoder_serves_the_base_recipe(tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    text = build_fast(cache, runs, "shapes_text")
    metrics = json.loads((text / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and set(metrics["probe"]) == set(metrics["probe_untrained"])
    assert set(metrics["probe"]["edit"]) == {"probe", "majority", "examples"}
    before = load_text_encoders(text)
    for name in ("text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in before[name].parameters())
    vae = build_fast(cache, runs, "shapes_vae")
    base = build_fast(cache, runs, "shapes_base", f"model.vae_path={vae}", f"model.text_path={text}",
                      "model.pooled_dropout=0.5")
    after = load_text_encoders(base)  # the base product's own text encoder folders
    for name in ("text_encoder", "text_encoder_2"):  # both frozen through the base's training
        old, new = before[name].state_dict(), after[name].state_dict()
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_masking_hides_only_words():
    module = TextEncoderModule({"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
                               {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2}, mask_fraction=0.5, probe_examples=40)
    for task in module.tasks.values():  # T5's and CLIP's
        tokenizer = task.tokenizer
        batch = tokenizer(["a photo of a red circle"] * 8, padding="max_length", max_length=12, return_tensors="pt")
        masked, labels = task.masked(batch.input_ids, batch.attention_mask, 0.5, torch.Generator().manual_seed(0))
        chosen = labels != -100
        assert chosen.any() and not chosen[batch.attention_mask == 0].any()
        assert not chosen[torch.isin(batch.input_ids, torch.tensor(tokenizer.all_special_ids))].any()
        assert (masked[~chosen] == batch.input_ids[~chosen]).all() and (masked == task.mask_id).any()
