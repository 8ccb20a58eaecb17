"""saelab-shout: an example third-party saelab plugin package."""

__version__ = "0.1.0"
