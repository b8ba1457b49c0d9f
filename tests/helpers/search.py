"""A search engine on the deterministic backends: the shared set-up of the search and sweep tests."""

from reflectionflow.search.config import SearchConfig
from reflectionflow.search.engine import SearchEngine
from reflectionflow.search.generator import DeterministicGenerator
from reflectionflow.search.reflectors import DeterministicPromptRefiner, DeterministicReflector
from reflectionflow.search.verifiers import DeterministicVerifier


def deterministic_engine(config: SearchConfig, generator=None, verifier=None) -> SearchEngine:
    """Deterministic generator (16 px, 3 steps), verifier, reflector and prompt refiner, unless given."""
    return SearchEngine(
        generator or DeterministicGenerator(size=16, num_inference_steps=3),
        verifier or DeterministicVerifier(),
        config,
        DeterministicReflector(),
        DeterministicPromptRefiner(),
    )
