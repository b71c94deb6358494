"""Compiler passes, each a small module with one job (see pipeline.py for their order)."""
