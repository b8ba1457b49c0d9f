"""The shapes evaluation through the real CLI: `experiment=shapes` runs the budget-matched presets (noise,
reflection search and an ablation of the corrector's input) with the exact checker and writes per-job
results, the scaling table and the plot (tiny budgets, untrained model and LoRA)."""

import csv
import json

import numpy as np
import pytest
from helpers.cli import run_cli
from PIL import Image

from reflectionflow.shapes.corrections import corrections, main, pass_rates
from reflectionflow.shapes.search import ShapesChecker, ShapesPromptRefiner, ShapesVerifier, shapes_prompts
from reflectionflow.shapes.world import PromptSpec, all_specs, render_scene, sample_scene


@pytest.fixture(scope="module")
def shapes_flux(tmp_path_factory):
    """An untrained shapes FluxPipeline (8x VAE as the recipe's, toy transformer) in diffusers format."""
    from reflectionflow.shapes.base import build_flux_pipeline
    from reflectionflow.shapes.text import TextEncoderModule
    from reflectionflow.shapes.vae import build_autoencoder

    root = tmp_path_factory.mktemp("flux")
    build_autoencoder((8, 8, 8, 8), 16, 1, 4).save_pretrained(root / "vae-product" / "vae")
    t5 = {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
    clip = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    TextEncoderModule(t5, clip, probe_examples=40).export(root / "text-product")
    pipe = build_flux_pipeline(
        str(root / "vae-product"),
        str(root / "text-product"),
        transformer={
            "num_layers": 1,
            "num_single_layers": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6],
        },
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def shapes_lora(shapes_flux, tmp_path_factory):
    """A random rank-2 corrector LoRA for `shapes_flux` (diffusers format), standing in for the recipe's."""
    import torch
    from diffusers import FluxTransformer2DModel

    from reflectionflow.models.lora import add_lora, save_lora
    from reflectionflow.models.settings import CorrectorSettings

    transformer = FluxTransformer2DModel.from_pretrained(shapes_flux / "transformer")
    torch.manual_seed(0)
    add_lora(transformer, rank=2, init=False)  # init=False: random B too, so the adapter changes the output
    settings = CorrectorSettings(str(shapes_flux), rank=2, condition_size=48, condition_position="aligned",
                                 lora_on_target=True, max_sequence_length=40)  # as the recipe trains
    return save_lora(transformer, tmp_path_factory.mktemp("lora") / "lora", settings)


def test_backends_judge_a_correct_render_correct():
    import asyncio

    item = shapes_prompts(1)[4]  # a position prompt
    spec = PromptSpec.from_geneval(item.record)
    image = render_scene(sample_scene(spec, np.random.default_rng(0)), 48)
    [score] = asyncio.run(ShapesVerifier().score([image], item.prompt, item.record))
    assert score.value == 1.0 and score.details["correct"] and ShapesChecker().check(image, item.record)
    blank = Image.new("RGB", (48, 48), "white")
    assert not ShapesChecker().check(blank, item.record)
    refined = asyncio.run(
        ShapesPromptRefiner().refine(blank, item.prompt, score, None, goal=item.prompt, meta=item.record)
    )
    (rephrased,) = [s for s in all_specs(spec.tag) if s.prompt == refined.text]
    assert refined.text != item.prompt and rephrased.canonical_key == spec.canonical_key  # other words
    assert ShapesChecker().check(image, rephrased.to_geneval())  # for the same scene


def test_shapes_experiment_writes_results_table_and_plot(tmp_path, shapes_flux, shapes_lora):
    result = run_cli(
        "infer",
        "experiment=shapes",
        f"weights.path={shapes_flux}",
        f"weights.lora_path={shapes_lora}",
        "prompts.n_per_category=1",
        "generator.num_inference_steps=2",
        "progress=false",
        "search=noise,reflectionflow,reflectionflow_no_condition",
        "search.budgets=[1,2]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/result.json"))
    assert len(results) == 3  # one job per preset, budgets 1 and 2 read off each
    presets = set()
    for path in results:
        run = json.loads(path.read_text())
        images = sum(json.loads(p.read_text())["budget"]["images"] for p in path.parent.glob("*/search.json"))
        assert images == run["budget"]["images"] <= 6 * 2  # the stop spends at most the largest budget
        assert [job["search_budget"] for job in run["budgets"]] == [1, 2]
        for job in run["budgets"]:
            presets.add(job["preset"])
            correct = [prompt["correct"] for prompt in job["per_prompt"]]
            assert job["prompts"] == 6 and job["checked"] == 6 and job["accuracy"] == sum(correct) / 6
            assert job["search"]["stop_score"] == 1.0
            assert job["budget"]["images"] <= 6 * job["search_budget"]
            if job["stopped"] == 0:
                assert job["per_prompt_budget"]["images"] == job["search_budget"]
            if job["preset"] != "noise" and job["search_budget"] == 2:  # a reflection per corrected image
                assert job["budget"]["reflector"]["calls"] == job["budget"]["images"] - 6 > 0
        if run["budgets"][0]["preset"] == "reflectionflow":  # every corrected image is read back, judged
            assert len(corrections(path.parent)) == run["budget"]["corrected_images"] > 0
    assert presets == {"noise", "reflectionflow", "reflectionflow_no_condition"}
    rows = list(csv.DictReader((tmp_path / "sweep" / "scaling.csv").open()))
    assert len(rows) == 6
    assert (tmp_path / "sweep" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cell_fidelity_splits_a_correction_into_edited_and_kept_cells():
    """On renders (read exactly): a perfect correction gets every cell right, returning the flawed image
    gets the kept cells right and no edited one, and a blank image gets nothing right."""
    from reflectionflow.shapes.evaluation import cell_fidelity
    from reflectionflow.shapes.triplets import heldout_flawed_cases
    from reflectionflow.shapes.world import detect_scene

    cases = heldout_flawed_cases(2, 48, seed=0, tags=["color_attr"], flaws=["wrong_color"])
    assert cases
    for case in cases:
        flawed, target = detect_scene(case.bad), detect_scene(case.good)
        edited, kept = cell_fidelity(flawed, target, target)
        assert len(edited) == 1 and len(kept) == 1 and all(edited + kept)  # one of two objects recoloured
        assert cell_fidelity(flawed, target, flawed) == ([False], [True])
        blank = detect_scene(Image.new("RGB", case.bad.size))
        assert cell_fidelity(flawed, target, blank) == ([False], [False])


def test_corrections_are_counted_per_edit_type_category_and_round(tmp_path, capsys):
    def candidate(round_, reflection, correct):
        return {"round": round_, "reflection": reflection,
                "score": {"value": float(correct), "ok": True, "details": {"correct": correct}}}

    searches = {
        "00000": ("position", [candidate(0, None, False),
                               candidate(1, "Move the red circle to the left of the blue square.", False),
                               candidate(2, "Change the blue circle to red. Move the red circle to the left of "
                                            "the blue square.", True)]),
        "00001": ("counting", [candidate(0, None, False), candidate(1, "Remove one circle.", True)]),
    }
    for index, (tag, candidates) in searches.items():
        (tmp_path / index).mkdir()
        (tmp_path / index / "search.json").write_text(json.dumps({"tag": tag, "candidates": candidates}))
    rates = pass_rates(corrections(tmp_path))
    assert rates["all"] == (2 / 3, 3)
    assert rates["move"] == (0.5, 2) and rates["only move"] == (0.0, 1) and rates["colour change"] == (1.0, 1)
    assert rates["removal"] == rates["only removal"] == (1.0, 1)
    assert rates["1 edit"] == (0.5, 2) and rates["2+ edits"] == (1.0, 1)
    assert rates["position"] == (0.5, 2) and rates["round 2"] == (1.0, 1)
    main([str(tmp_path)])
    assert "| only move | 0.0% (1) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .* holds no corrected images"):
        main([str(tmp_path / "00000")])
