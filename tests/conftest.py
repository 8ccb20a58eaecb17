"""Shared fixtures for the whole suite.

- every test gets its own results tree (``SAELAB_RESULTS_DIR`` -> ``tmp_path/results``); the user
  cache dir (``SAELAB_CACHE_DIR``) is left alone on purpose: the converted embedded model lives there
  and is reused across tests and runs;
- the plugin manager is reset around every test, and plugins registered in code or disabled during a
  test are forgotten afterwards;
- ``cli`` runs ``saelab.cli.main(args)`` in-process and returns a :class:`CliResult`;
- :func:`run_saelab_subprocess` runs ``python -m saelab ...`` in a fresh interpreter (import with
  ``from conftest import run_saelab_subprocess``, or use the ``saelab_subprocess`` fixture).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests never use the network; set before anything imports huggingface_hub (it reads these at import).
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

from saelab import manager  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Root of the source checkout."""


@dataclass
class CliResult:
    """What one ``saelab`` invocation produced."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together."""
        return self.stdout + self.stderr

    def assert_user_error(self, *fragments: str) -> None:
        """Exit code 2, exactly one line on stderr, no traceback, and each fragment in that line."""
        assert self.exit_code == 2, f"exit {self.exit_code}; stderr: {self.stderr!r}"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got: {self.stderr!r}"
        assert "Traceback" not in self.output
        for fragment in fragments:
            assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


class _Capture(io.TextIOWrapper):
    """A text stream with a ``buffer``, so code writing bytes to ``sys.stdout.buffer`` works too."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8", errors="replace", write_through=True)

    def getvalue(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode("utf-8", errors="replace")  # type: ignore[attr-defined]


def invoke_saelab(args: Sequence[str], env: Mapping[str, str | None] | None = None) -> CliResult:
    """Run ``saelab.cli.main(args)`` in this process, capturing stdout, stderr and the exit code.

    ``env`` sets (or, with ``None`` values, removes) environment variables for the call only.
    The plugin manager is reloaded before the call so that environment changes take effect.
    """
    from saelab import cli

    saved = {key: os.environ.get(key) for key in (env or {})}
    out, err = _Capture(), _Capture()
    code: int
    try:
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        manager.reset()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        manager.reset()
    return CliResult(code, out.getvalue(), err.getvalue())


def run_saelab_subprocess(
    args: Sequence[str],
    env: Mapping[str, str | None] | None = None,
    *,
    timeout: float = 600,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m saelab ARGS`` in a fresh interpreter (this one's ``sys.executable``).

    The child inherits this process's environment (so the per-test ``SAELAB_RESULTS_DIR``), updated
    with ``env`` (``None`` values remove a variable). Returns the completed process with text
    stdout/stderr; ``check=True`` raises when the exit code is not 0.
    """
    child_env = dict(os.environ)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    proc = subprocess.run(
        [sys.executable, "-m", "saelab", *args],
        env=child_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"saelab {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _isolate_results_and_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Per-test results tree and a clean plugin manager (in-code plugins and disables undone)."""
    monkeypatch.setenv("SAELAB_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    in_code = list(manager._in_code)
    disabled = set(manager._extra_disabled)
    manager.reset()
    yield
    manager._in_code[:] = in_code
    manager._extra_disabled.clear()
    manager._extra_disabled.update(disabled)
    manager.reset()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``n`` torch intra-op threads inside the block (small products run faster so on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for this test."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``)."""
    with torch_threads(1):
        yield


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """This test's results tree (what ``SAELAB_RESULTS_DIR`` points to)."""
    return tmp_path / "results"


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """``cli("plugins", "--json", env={...})`` runs saelab in-process and returns a :class:`CliResult`."""

    def run(*args: str, env: Mapping[str, str | None] | None = None) -> CliResult:
        flat = list(args[0]) if len(args) == 1 and not isinstance(args[0], str) else list(args)
        return invoke_saelab(flat, env=env)

    return run


@pytest.fixture
def saelab_subprocess() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The :func:`run_saelab_subprocess` helper as a fixture."""
    return run_saelab_subprocess
