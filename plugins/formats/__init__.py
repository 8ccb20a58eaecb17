"""Builtin formats plugins."""
