"""The mini world: a synthetic concept-and-style world for running every protocol on a CPU."""

from lorabench.world.spec import Identity, Scene, Style, World, make_world

__all__ = ["Identity", "Scene", "Style", "World", "make_world"]
