"""Frontends: each builds the Cascade IR from one way of writing a spec."""
