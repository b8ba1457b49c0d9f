"""Shapes world: GenRef-format triplet shards written, read back through webdataset and checked."""

from __future__ import annotations

import json

import numpy as np
import webdataset as wds

from reflectionflow.shapes.triplets import heldout_flawed_cases, write_genref_shards
from reflectionflow.shapes.world import (
    PromptSpec,
    apply_reflection,
    check_image,
    detect_scene,
    instruction_triplets,
    make_flawed,
    make_triplet,
    render_scene,
    rendered_triplets,
    sample_example,
    sample_scene,
)

GENREF_KEYS = {"good_image.jpg", "bad_image.jpg", "reflection.txt", "prompt.txt", "subset.txt"}


def test_shards_round_trip_and_the_checker_reads_the_jpegs(tmp_path):
    count = write_genref_shards(rendered_triplets(40, seed=0), str(tmp_path / "shapes-%04d.tar"), maxcount=16)
    assert count == 40
    shards = sorted(str(p) for p in tmp_path.glob("shapes-*.tar"))
    assert len(shards) == 3

    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == 40
    subsets = set()
    for sample in samples:
        assert GENREF_KEYS <= set(sample)
        meta = sample["meta.json"]
        spec = PromptSpec.from_geneval(meta["geneval"])
        assert sample["prompt.txt"] == spec.prompt
        subsets.add(sample["subset.txt"])
        good, bad = sample["good_image.jpg"], sample["bad_image.jpg"]
        assert good.size == bad.size == (48, 48)
        assert check_image(good, spec).correct
        assert not check_image(bad, spec).correct
        # The reflection read back from the shard still fixes the image it was written for.
        fixed = apply_reflection(detect_scene(bad), sample["reflection.txt"])
        assert check_image(render_scene(fixed), spec).correct
        if sample["subset.txt"] == "editing":
            assert [o.cell for o in detect_scene(good).objects] == [
                o.cell for o in detect_scene(render_scene(fixed)).objects
            ]
    assert subsets == {"general", "editing"}
    assert json.loads(json.dumps(samples[0]["meta.json"]))["flaw"]


def test_make_triplet_skips_images_that_are_already_correct():
    rng = np.random.default_rng(0)
    spec, scene = sample_example(rng)
    assert make_triplet(spec, render_scene(scene), rng, editing=True) is None


def test_a_passing_sample_of_the_same_prompt_makes_a_rule_triplet():
    rng = np.random.default_rng(1)
    spec, scene = sample_example(rng, tags=("colors",))
    passing = render_scene(sample_scene(spec, rng))
    flawed, _ = make_flawed(spec, scene, rng)
    triplet = make_triplet(spec, render_scene(flawed), rng, editing=True, good=passing)
    assert triplet.subset == "rule" and triplet.good is passing and triplet.reflection


def test_an_instruction_edit_keeps_the_prompt_satisfied_and_only_the_reflection_says_what_changes():
    triplets = list(instruction_triplets(30, seed=3))
    assert {t.meta["flaw"] for t in triplets} == {"instruction_colour", "instruction_move"}
    for triplet in triplets:
        spec = PromptSpec.from_geneval(triplet.meta["geneval"])
        assert check_image(triplet.bad, spec).correct and check_image(triplet.good, spec).correct
        edited = apply_reflection(detect_scene(triplet.bad), triplet.reflection)
        assert [(o.shape, o.color, o.cell) for o in detect_scene(render_scene(edited)).objects] == [
            (o.shape, o.color, o.cell) for o in detect_scene(triplet.good).objects]
        assert detect_scene(triplet.bad).objects != detect_scene(triplet.good).objects


def test_heldout_cases_narrow_to_a_rung_of_the_ladder_and_default_to_every_prompt():
    every = heldout_flawed_cases(2, 48, seed=0)
    assert len(every) == 12  # one per held-out prompt, 2 per category
    rung = heldout_flawed_cases(4, 48, seed=0, tags=["color_attr", "position"], flaws=["wrong_color"])
    assert len(rung) == 8
    assert {c.meta["spec"].tag for c in rung} == {"color_attr", "position"}
    assert {c.meta["flaw"] for c in rung} == {"wrong_color"}
    assert all(c.reflection.startswith("Change ") for c in rung)
