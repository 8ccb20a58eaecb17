"""Builtin non activating plugins."""
