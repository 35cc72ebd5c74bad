"""Every Python block of README.md and docs/ runs as printed.

Each block is run on its own, in a fresh namespace, the way a reader would
run it: a top-level ``await`` as in ``python -m asyncio`` (the asyncio REPL,
or a notebook), and an ``async def main()`` that the block defines is then
awaited (its ``if __name__ == "__main__"`` guard does not fire). A block
included from a file (``--8<-- "examples/...py"``) is run as that file.

A marker comment on the line before a block says how else to treat it:

- ``<!-- sample: fake -->``: a ``FakeKommo`` (talks 1-1000) stands in for
  the account. Its URL replaces ``https://example.kommo.com``; the environment holds what the
  command line reads (``KOMMO_BASE_URL``, ``KOMMO_TOKEN``,
  ``KOMMO_CLIENT_ID``, ``KOMMO_CLIENT_SECRET``, ``KOMMO_REDIRECT_URI``) and
  ``BOT_SECRET``, each the fake's; the block runs in an empty directory whose
  ``kommo-tokens.json`` holds a pair the fake issued, as ``kommo-talks auth``
  leaves it.
- ``<!-- sample: fragment -->``: a piece of the examples before it on the
  page (it uses their ``client``). It is compiled, not run, and every name
  it uses must be a builtin, bound in it, or bound by a block before it on
  the same page: a missing import fails.

A block that defines a ``test_`` function is a pytest sample: those are run
by ``tests/test_pytest_plugin.py`` under default pytest-asyncio settings;
here it is only checked that that test collects them. Any other block
without a marker must run.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
import re
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pytest_plugin import TEST_DEF, doc_samples

from kommo_talks import FileTokenStore
from kommo_talks.testing import FakeKommo

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT_URL = "https://example.kommo.com"
MARKERS = {"fake", "fragment"}
BLOCK = re.compile(
    r"(?:^ *<!-- sample: (?P<marker>[\w-]+) -->\n)?"  # the marker line, if any
    r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"\n?$')


@dataclass(frozen=True)
class Sample:
    """One Python block of the docs, with where it is and its marker."""

    where: str
    code: str
    marker: str | None
    indented: bool

    @property
    def is_pytest_sample(self) -> bool:
        return bool(TEST_DEF.search(self.code))


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def collect() -> list[Sample]:
    samples = []
    for page in pages():
        text = page.read_text("utf-8")
        for match in BLOCK.finditer(text):
            code = textwrap.dedent(match["code"])
            if snippet := SNIPPET.match(code):
                code = (ROOT / snippet["path"]).read_text("utf-8")
            line = text.count("\n", 0, match.start("indent")) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            samples.append(Sample(where, code, match["marker"], bool(match["indent"])))
    return samples


def distinct(samples: list[Sample]) -> list[Sample]:
    """One sample per code and marker: a file included twice (README, quickstart) runs once."""
    first: dict[tuple[str, str | None], Sample] = {}
    for sample in samples:
        key = (sample.code, sample.marker)
        if key in first:
            seen = first[key]
            sample = Sample(f"{seen.where}+{sample.where}", seen.code, seen.marker, seen.indented)
        first[key] = sample
    return list(first.values())


ALL_SAMPLES = collect()
SAMPLES = distinct(ALL_SAMPLES)


def compile_sample(sample: Sample) -> types.CodeType:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    code: types.CodeType = compile(sample.code, sample.where, "exec", flags, dont_inherit=True)
    return code


def bound_names(tree: ast.AST) -> set[str]:
    """Every name a block binds anywhere: imports, assignments, defs, arguments, targets."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def used_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def unknown_names(sample: Sample) -> set[str]:
    """Names a fragment uses that neither it, blocks before it on its page, nor builtins bind."""
    page = sample.where.split(":")[0]
    known = set(dir(builtins))
    for other in ALL_SAMPLES:
        if other.where == sample.where:
            break
        if other.where.split(":")[0] == page:
            known |= bound_names(ast.parse(other.code))
    tree = ast.parse(sample.code)
    return used_names(tree) - bound_names(tree) - known


async def run_sample(code: types.CodeType) -> None:
    """Run a compiled block like the asyncio REPL does, then its ``main()`` if it has one."""
    namespace: dict[str, object] = {"__name__": "__doc_sample__"}
    result = eval(code, namespace)  # noqa: S307 - the docs' own samples
    if inspect.isawaitable(result):
        await result
    main = namespace.get("main")
    if inspect.iscoroutinefunction(main):
        await main()


async def run_against_fake(
    sample: Sample, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    talks_to_kommo = ACCOUNT_URL in sample.code
    assert talks_to_kommo or "os.environ" in sample.code, f"{sample.where} needs no fake"
    async with FakeKommo(talks=range(1, 1001)) as fake:
        await FileTokenStore(directory / "kommo-tokens.json").save(fake.oauth.issue_tokens())
        monkeypatch.chdir(directory)
        for name, value in {
            "KOMMO_BASE_URL": fake.url,
            "KOMMO_TOKEN": fake.token,
            "KOMMO_CLIENT_ID": fake.oauth.client_id,
            "KOMMO_CLIENT_SECRET": fake.oauth.client_secret,
            "KOMMO_REDIRECT_URI": fake.oauth.redirect_uri,
            "BOT_SECRET": "s3cret",
            "NO_PROXY": "127.0.0.1",  # a session with trust_env never proxies the fake
            "no_proxy": "127.0.0.1",
        }.items():
            monkeypatch.setenv(name, value)
        swapped = Sample(sample.where, sample.code.replace(ACCOUNT_URL, fake.url), None, False)
        await run_sample(compile_sample(swapped))
        if talks_to_kommo:
            assert fake.stats.requests > 0, f"{sample.where} sent nothing to the fake"


def test_the_docs_have_python_samples_and_only_known_markers() -> None:
    assert len(ALL_SAMPLES) >= 30
    assert {s.marker for s in ALL_SAMPLES} <= MARKERS | {None}
    wheres = {s.where.split(":")[0] for s in ALL_SAMPLES}
    assert {"README.md", "docs/index.md", "docs/guides/bots.md"} <= wheres
    markers = sum(page.read_text("utf-8").count("<!-- sample:") for page in pages())
    assert markers == sum(s.marker is not None for s in ALL_SAMPLES), "a marker not on a block"


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.where for s in SAMPLES])
def test_sample_runs_as_printed(
    sample: Sample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = compile_sample(sample)  # every block, fragments too, is valid Python
    if sample.is_pytest_sample:
        assert sample.marker is None, sample.where
        assert not sample.indented, f"{sample.where}: the plugin test reads unindented blocks"
        assert sample.code in doc_samples().values(), f"{sample.where} is not run as a test"
    elif sample.marker == "fake":
        asyncio.run(run_against_fake(sample, tmp_path, monkeypatch))
    elif sample.marker is None:
        monkeypatch.chdir(tmp_path)
        asyncio.run(run_sample(code))
    else:
        assert unknown_names(sample) == set(), f"{sample.where} uses names bound nowhere"
