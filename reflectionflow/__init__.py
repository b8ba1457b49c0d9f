"""ReflectionFlow: reflection tuning of FLUX and inference-time search over noise, prompt and reflection."""

