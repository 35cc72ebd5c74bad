"""README links and the sdist: what the docs point at or include is shipped.

kommo-talks is not published on a package index yet, so the README is read
in a clone or an unpacked sdist, where its relative links work as long as
their targets are shipped (an absolute URL needs a public home, not known
yet). The sdist also carries what the docs include (``--8<--``) and what the
tests load (``examples/``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def sdist_includes() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    include: list[str] = config["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    return include


def shipped(path: str) -> bool:
    """True if ``path`` (relative to the repository) is in an sdist include entry."""
    parts = Path(path).parts
    return any(Path(*parts[: len(Path(entry).parts)]) == Path(entry) for entry in sdist_includes())


def test_readme_relative_links_point_at_files_the_sdist_ships() -> None:
    targets = [m["target"] for m in LINK.finditer((ROOT / "README.md").read_text("utf-8"))]
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t)]

    assert "docs/quickstart.md" in relative
    for target in relative:
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
        assert shipped(target), f"README links to {target}, which the sdist leaves out"


def test_sdist_ships_the_examples_and_what_the_docs_include() -> None:
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    included = {
        path
        for page in pages
        for path in re.findall(r'^--8<-- "([^"]+)"', page.read_text("utf-8"), re.M)
    }

    assert "examples/quickstart.py" in included
    for path in [*included, "examples/close_on_done_bot.py", "mkdocs.yml"]:
        assert shipped(path), f"the sdist leaves out {path}"
