"""``python -m saelab COMMAND ...`` or the delphi-style ``python -m saelab MODEL SPARSE_MODEL ...``."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="python -m saelab")
