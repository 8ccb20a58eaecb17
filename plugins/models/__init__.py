"""Builtin models plugins."""
