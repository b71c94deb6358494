"""The Triton backend: a printer from the Tile IR to Python module source."""

from attndsl.codegen.triton import generate

__all__ = ["generate"]
