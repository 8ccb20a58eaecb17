"""saelab's builtin plugins. Each module is an ordinary plugin registered through the ``saelab``
entry-point group in pyproject.toml, exactly like a third-party one."""
