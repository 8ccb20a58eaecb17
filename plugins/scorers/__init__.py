"""Builtin scorers plugins."""
