"""Builtin commands plugins."""
