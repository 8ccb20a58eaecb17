"""Builtin architectures plugins."""
