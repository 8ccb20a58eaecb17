"""Builtin providers plugins."""
