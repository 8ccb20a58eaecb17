"""Placeholder plugin module (not implemented yet)."""
