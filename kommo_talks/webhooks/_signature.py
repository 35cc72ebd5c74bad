"""``verify_disconnect_signature``: Kommo's "integration disconnected" hook."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["verify_disconnect_signature"]


def verify_disconnect_signature(
    *, client_id: str, client_secret: str, account_id: int | str, signature: object
) -> bool:
    """Check the signature of Kommo's "integration disconnected" hook.

    The expected signature is the lowercase hex HMAC-SHA256 of
    ``f"{client_id}|{account_id}"`` keyed with ``client_secret``, compared in
    constant time. Returns ``False`` (never raises) for a signature that is
    not a ``str`` or ``bytes``, or not ASCII.

    Raises:
        ValueError: ``client_secret`` is empty or blank: anyone can compute
            an HMAC with such a key, so no signature could prove anything.
    """
    if not isinstance(client_secret, str) or not client_secret.strip():
        raise ValueError("client_secret must be the integration's (non-blank) secret key")
    if isinstance(signature, str):
        if not signature.isascii():
            return False
        given = signature.encode("ascii")
    elif isinstance(signature, bytes):
        given = signature
    else:
        return False
    expected = hmac.new(
        client_secret.encode("utf-8"), f"{client_id}|{account_id}".encode(), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(given, expected.encode("ascii"))
