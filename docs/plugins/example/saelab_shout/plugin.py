"""The ``shout`` plugin module (entry point ``shout``): a ``shout`` dataset and a ``hello`` command.

It imports only saelab's public API, exactly like the builtin plugins under ``saelab.plugins``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click
from saelab import Dataset, hookimpl
from saelab.data import DatasetOptions


class ShoutOptions(DatasetOptions):
    """Options of the ``shout`` dataset (the ``--dataset_*`` options plus its own)."""

    text: str = "sparse dictionaries find features"
    """Sentence to shout (``--dataset_repo shout:<text>`` overrides it)."""
    repeat: int = 100
    """Number of documents produced."""


class ShoutDataset(Dataset):
    """Upper-cased copies of one sentence (a toy dataset for the plugin guide)."""

    name = "shout"
    aliases = ("loud",)
    Options = ShoutOptions

    @classmethod
    def accepts(cls, repo: str) -> bool:
        """Accept ``shout:<text>`` as a dataset repo."""
        return repo.startswith("shout:")

    @property
    def text(self) -> str:
        """The sentence: the part of ``shout:<text>`` after the colon, else the ``text`` option."""
        _, colon, text = self.repo.partition(":")
        return text if colon and text else self.options.text

    def texts(self) -> Iterator[str]:
        """``repeat`` upper-cased documents numbered from 1."""
        for i in range(self.options.repeat):
            yield f"{self.text.upper()}! ({i + 1})"

    def identity(self) -> dict[str, Any]:
        """Everything that changes the documents."""
        return {"dataset": self.name, "text": self.text, "repeat": self.options.repeat}


@hookimpl
def register_datasets(register):  # noqa: ANN001 - the hookspec documents the signature
    register(ShoutDataset)


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command()
    @click.argument("who", default="world")
    @click.option("--loud", is_flag=True, help="Shout the greeting.")
    def hello(who: str, loud: bool) -> None:
        """Greet WHO (an example command added by the saelab-shout plugin)."""
        message = f"Hello, {who}!"
        click.echo(message.upper() if loud else message)
