"""Builtin neighbours plugins."""
