"""Runtime: CompiledModule, artifacts, generation."""

from qcompile.runtime.artifact import FORMAT_VERSION, load_artifact
from qcompile.runtime.compiled import CompiledModule, GenerationStats

__all__ = ["CompiledModule", "GenerationStats", "FORMAT_VERSION", "load_artifact"]
