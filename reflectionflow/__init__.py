"""ReflectionFlow: reflection tuning of FLUX and inference-time search over noise, prompt and reflection."""

from reflectionflow import recipes as _recipes  # noqa: F401  registers the ${rf.recipe:...} config resolver
