"""Builtin explainers plugins."""
