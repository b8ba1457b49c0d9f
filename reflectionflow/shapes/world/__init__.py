"""A miniature world for ReflectionFlow on CPU: coloured shapes on a 3 x 3 grid, prompts in GenEval's six
categories, an exact checker (the verifier), a rule-based reflector, an editor that carries out its
reflections, and GenRef-format triplets of (flawed image, reflection, correct image)."""

from reflectionflow.shapes.world.captions import caption_allowed, caption_spec
from reflectionflow.shapes.world.checker import CheckResult, Problem, check_image, check_scene
from reflectionflow.shapes.world.detect import detect_objects, detect_scene
from reflectionflow.shapes.world.editor import apply_edits, apply_reflection
from reflectionflow.shapes.world.edits import parse_reflection, reflection_text
from reflectionflow.shapes.world.flaws import EXPECTED_PROBLEMS, FLAWS, applicable_flaws, make_flawed
from reflectionflow.shapes.world.reflector import plan_edits, reflect
from reflectionflow.shapes.world.render import render_scene
from reflectionflow.shapes.world.sampling import (
    all_specs,
    heldout_eval_set,
    is_heldout,
    sample_example,
    sample_scene,
    split_specs,
)
from reflectionflow.shapes.world.scene import Scene, ShapeObject, relation_holds
from reflectionflow.shapes.world.spec import ObjectRequirement, PromptSpec
from reflectionflow.shapes.world.triplets import (
    Triplet,
    instruction_triplets,
    make_triplet,
    rendered_triplets,
)
from reflectionflow.shapes.world.vocabulary import CAPTION, CATEGORIES, COLORS, DEFAULT_SIZE, SHAPES

__all__ = [
    "CAPTION",
    "CATEGORIES",
    "COLORS",
    "DEFAULT_SIZE",
    "EXPECTED_PROBLEMS",
    "FLAWS",
    "SHAPES",
    "CheckResult",
    "ObjectRequirement",
    "Problem",
    "PromptSpec",
    "Scene",
    "ShapeObject",
    "Triplet",
    "all_specs",
    "applicable_flaws",
    "apply_edits",
    "apply_reflection",
    "caption_allowed",
    "caption_spec",
    "check_image",
    "check_scene",
    "detect_objects",
    "detect_scene",
    "heldout_eval_set",
    "instruction_triplets",
    "is_heldout",
    "make_flawed",
    "make_triplet",
    "parse_reflection",
    "plan_edits",
    "reflect",
    "reflection_text",
    "relation_holds",
    "render_scene",
    "rendered_triplets",
    "sample_example",
    "sample_scene",
    "split_specs",
]
