"""A test tool: no secret anywhere in an exception or the exceptions chained to it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception reachable through ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def assert_no_secret(error: BaseException, secrets: Iterable[str]) -> None:
    """Fail if a secret shows in the message, repr, args or attributes of ``error``'s chain."""
    secrets = list(secrets)
    for link in chain(error):
        views = {
            "str": str(link),
            "repr": repr(link),
            "args": repr(link.args),
            "vars": repr(vars(link)) if hasattr(link, "__dict__") else "",
            "notes": repr(getattr(link, "__notes__", "")),
        }
        for view, text in views.items():
            for secret in secrets:
                assert secret not in text, f"{secret!r} in {view} of {type(link).__name__}: {text}"
