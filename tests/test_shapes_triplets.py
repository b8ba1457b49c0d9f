"""Shapes world: GenRef-format triplet shards written, read back through webdataset and checked."""

from __future__ import annotations

import hashlib
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


def test_compound_renders_carry_two_mistakes_and_weights_pick_the_categories():
    from reflectionflow.shapes.evaluation import edit_groups

    single = list(rendered_triplets(60, seed=0, editing_fraction=1.0))
    assert all("+" not in t.meta["flaw"] for t in single)
    # The defaults draw what they drew before the options existed, so cached shards stay valid: the
    # digest of these 60 triplets as the code of 2192941 (no tag_weights, no compound) made them.
    drawn = "|".join(f"{t.meta['flaw']}:{t.reflection}" for t in single)
    assert hashlib.sha256(drawn.encode()).hexdigest()[:16] == "8cc0c04ebb800940"
    compound = list(rendered_triplets(60, seed=0, editing_fraction=1.0, compound=1.0))
    two = [t for t in compound if "+" in t.meta["flaw"]]
    assert len(two) > 40  # a second mistake the checker sees is found for most scenes
    assert all(len(t.meta["problems"]) >= 2 for t in two)
    assert sum(edit_groups(t.reflection)[1] == "2+ edits" for t in two) > 0.8 * len(two)
    for t in two:  # still a triplet: the flawed image fails, the good one passes
        spec = PromptSpec.from_geneval(t.meta["geneval"])
        assert not check_image(t.bad, spec).correct and check_image(t.good, spec).correct
    weighted = list(rendered_triplets(40, seed=0, tags=("position", "colors"), tag_weights=[1.0, 0.0]))
    assert {t.meta["geneval"]["tag"] for t in weighted} == {"position"}
