"""Synthetic tasks with known answers, for tests, tutorials and benchmarks."""

from .planted import PlantedTask, planted_delta, planted_mlp, planted_teacher

__all__ = ["PlantedTask", "planted_delta", "planted_mlp", "planted_teacher"]
