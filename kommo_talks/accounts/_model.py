"""The installed-account record, its error, and the check of an install's ``referer``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

import attrs

from ..errors import KommoError

__all__ = ["Account", "AccountNotInstalledError", "account_base_url", "check_account_id"]

# One DNS label before a Kommo domain: "example.kommo.com", never "a.b.kommo.com".
_KOMMO_HOST: Final = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.(?:kommo\.com|amocrm\.ru|amocrm\.com)$"
)
_LOOPBACK: Final = re.compile(r"^(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?$")


class AccountNotInstalledError(KommoError):
    """The account has not installed the integration (or has uninstalled it).

    Attributes:
        account_id: the account asked for.
    """

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        super().__init__(f"Kommo account {account_id} has not installed this integration")


def check_account_id(account_id: object) -> int:
    """``account_id`` if it is a positive ``int`` (not ``bool``), else ``ValueError``."""
    if type(account_id) is not int or account_id <= 0:
        raise ValueError(f"account_id must be a positive int, got {type(account_id).__name__}")
    return account_id


@attrs.frozen
class Account:
    """A Kommo account that installed the integration.

    Attributes:
        id: the account ID (``account[id]`` in webhooks).
        subdomain: the account's subdomain (``account[subdomain]``).
        base_url: the account's API address, e.g. ``https://example.kommo.com``.
        installed_at: when it was (last) installed, in UTC.
    """

    id: int = attrs.field(validator=lambda _, __, value: check_account_id(value))
    subdomain: str = attrs.field(validator=attrs.validators.instance_of(str))
    base_url: str = attrs.field(validator=attrs.validators.instance_of(str))
    installed_at: datetime = attrs.field(validator=attrs.validators.instance_of(datetime))

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (``installed_at`` in ISO 8601)."""
        return {
            "id": self.id,
            "subdomain": self.subdomain,
            "base_url": self.base_url,
            "installed_at": self.installed_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Account:
        """Read :meth:`to_json`'s object; ``ValueError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("account record is not a JSON object")
        try:
            installed_at = datetime.fromisoformat(data["installed_at"])
            return cls(
                data["id"], data["subdomain"], data["base_url"], installed_at.astimezone(UTC)
            )
        except KeyError as exc:
            raise ValueError(f"account record: {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"account record: {exc}") from None


def account_base_url(referer: object, *, allow_loopback: bool = False) -> str:
    """The API address of the account an install redirect's ``referer`` names.

    Kommo sends the account's host (``example.kommo.com``); a scheme is
    tolerated. Only one label under ``kommo.com``, ``amocrm.ru`` or
    ``amocrm.com`` is accepted (``https://``), and loopback hosts with a port
    (``http://``) when ``allow_loopback`` (tests only): the code is exchanged
    there, so anything else would send the integration's secret elsewhere.

    Raises:
        ValueError: any other referer.
    """
    if not isinstance(referer, str):
        raise ValueError("referer must be the account's host, e.g. example.kommo.com")
    host = referer.strip().lower()
    for scheme in ("https://", "http://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    host = host.removesuffix("/")
    if _KOMMO_HOST.fullmatch(host) and not referer.strip().lower().startswith("http://"):
        return f"https://{host}"
    if allow_loopback and _LOOPBACK.fullmatch(host):
        return f"http://{host}"
    raise ValueError(
        "referer is not a Kommo account domain (*.kommo.com, *.amocrm.ru, *.amocrm.com)"
    )
