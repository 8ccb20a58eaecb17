"""Builtin samplers plugins."""
