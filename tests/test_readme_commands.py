"""The README's two commands, run as a newcomer runs them on a stock system Python.

Debian 12+ and Ubuntu 23.04+ mark ``/usr/bin/python3`` externally managed
(PEP 668): ``pip install`` into it stops with ``externally-managed-environment``.
The commands must work there as printed, in a fresh ``git clone``, with a new
``HOME`` and nothing but the system's ``/usr/bin:/bin`` on ``PATH`` (no pyenv,
no ``~/.local/bin``). The clone is of the committed ``HEAD``: commit a README
change before running these tests.

Cheap by design: pip installs from the runner's pip cache (the nox session
filled it), the demo runs on 30 talks instead of 300 (about 1 s instead of
12 s) and the test command stops at ``nox --list``, which shows the sessions
it selected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_PATH = "/usr/bin:/bin"


def readme_commands(readme: str) -> list[str]:
    """The one-line ``console`` blocks of the README's "Try it: two commands"."""
    section = readme.split("## Try it: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```console\n(.+)\n```", section)


def pip_cache_dir() -> str:
    """The runner's pip cache, which the newcomer's pip reuses (the downloads are the same)."""
    if cache := os.environ.get("PIP_CACHE_DIR"):
        return cache
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")


@dataclass
class Newcomer:
    clone: Path
    env: dict[str, str]

    def run(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["/bin/bash", "-c", command],
            cwd=self.clone,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Newcomer:
    """A fresh clone of this repository and the environment of a new user of the system Python."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no system Python at {SYSTEM_PYTHON} (checked on Debian/Ubuntu hosts and CI)")
    assert shutil.which("python3", path=SYSTEM_PATH) == str(SYSTEM_PYTHON)
    base = tmp_path_factory.mktemp("newcomer")
    clone, home = base / "kommo-talks", base / "home"
    home.mkdir()
    git = shutil.which("git", path=SYSTEM_PATH)
    assert git, "git is needed to clone the repository as the README says"
    subprocess.run([git, "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "CI"))}
    env.update(HOME=str(home), PATH=SYSTEM_PATH, PIP_CACHE_DIR=pip_cache_dir())
    return Newcomer(clone, env)


def test_readme_shows_two_commands_one_of_them_the_demo() -> None:
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) == 2
    assert "kommo-talks demo" in commands[0]
    assert "nox -s tests lint typing" in commands[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == [test]


def test_demo_command_runs_the_demo_on_the_system_python(newcomer: Newcomer) -> None:
    demo, _ = readme_commands((newcomer.clone / "README.md").read_text(encoding="utf-8"))

    result = newcomer.run(f"{demo} --talks 30")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: all 30 talks closed, 0 answers 429." in result.stdout
    assert (newcomer.clone / ".venv" / "bin" / "kommo-talks").exists()


def test_test_command_gets_nox_to_run_tests_on_each_python_lint_and_typing(
    newcomer: Newcomer,
) -> None:
    _, test = readme_commands((newcomer.clone / "README.md").read_text(encoding="utf-8"))

    result = newcomer.run(f"{test} --list")

    assert result.returncode == 0, result.stdout + result.stderr
    selected = re.findall(r"^\* (\S+)", result.stdout, flags=re.MULTILINE)
    assert selected == ["tests-3.11", "tests-3.12", "tests-3.13", "lint", "typing"]


def test_test_command_fails_under_ci_on_a_missing_python_and_skips_it_elsewhere(
    newcomer: Newcomer,
) -> None:
    _, test = readme_commands((newcomer.clone / "README.md").read_text(encoding="utf-8"))

    under_ci = newcomer.run(f"{test} --force-python 3.99", CI="true")
    elsewhere = newcomer.run(".venv/bin/nox -s tests --force-python 3.99")

    assert under_ci.returncode != 0
    assert "Session tests-3.99 failed: Python interpreter 3.99 not found." in under_ci.stderr
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "Session tests-3.99 skipped: Python interpreter 3.99 not found." in elsewhere.stderr
