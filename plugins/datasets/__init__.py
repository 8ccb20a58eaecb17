"""Builtin datasets plugins."""
