"""Every task of the project: `nox -s tests lint typing docs bench`.

`tests` runs on each Python the package supports (3.11, 3.12, 3.13) that is
installed. One that is missing is skipped with a warning, or fails the run
when the `CI` environment variable is set (`--error-on-missing-interpreters`).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"  # nox.project.dependency_groups
nox.options.sessions = ["tests", "lint", "typing"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = "CI" in os.environ

PYTHONS = ["3.11", "3.12", "3.13"]  # as the classifiers in pyproject.toml
PYPROJECT = nox.project.load_toml("pyproject.toml")


def group(name: str) -> list[str]:
    return nox.project.dependency_groups(PYPROJECT, name)


def reach_pyenv_pythons() -> None:
    """Let nox find every Python that pyenv installed, not only pyenv's selected ones.

    pyenv's shims run only the versions chosen with `pyenv global` or `pyenv local`,
    so nox would report an installed 3.12 as missing. Their bin directories go at
    the end of PATH: what PATH already finds keeps precedence.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    try:
        installed = sorted(p for p in (root / "versions").iterdir() if p.name[:1].isdigit())
    except OSError:  # no pyenv, or not readable by this user
        return
    wanted = [str(p / "bin") for p in installed if p.name.rsplit(".", 1)[0] in PYTHONS]
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *wanted])


reach_pyenv_pythons()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (warnings are errors; Redis tests start their own server)."""
    session.install("-e", ".[redis]", *group("test"))
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, and the import contracts (lint-imports)."""
    session.install("-e", ".", *group("lint"))  # import-linter reads the installed package
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict on the package and the tests."""
    session.install("-e", ".[redis]", *group("typing"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly (any warning fails)."""
    session.install("-e", ".", *group("docs"))
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks; each prints its figures next to its target."""
    session.install("-e", ".[redis]", *group("test"))
    scripts = session.posargs or sorted(str(p) for p in Path("benchmarks").glob("bench_*.py"))
    for script in scripts:
        session.log(f"== {script}")
        session.run("python", script)
