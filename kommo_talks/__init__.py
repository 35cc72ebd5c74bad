"""kommo-talks: an asyncio SDK for the Talks (conversations) API of Kommo CRM v4.

Everything public is importable from here, except the Redis pieces
(``kommo_talks.redis``, extra ``kommo-talks[redis]``), the webhook pieces
(``kommo_talks.webhooks``) and the fake server (``kommo_talks.testing``).
"""

from ._version import __version__
from .accounts import (
    Account,
    AccountNotInstalledError,
    AccountStore,
    FileAccountStore,
    KommoAccounts,
    MemoryAccountStore,
)
from .auth import LongLivedToken
from .client import KommoClient
from .converter import converter
from .errors import (
    APIError,
    ClientClosedError,
    CoordinationError,
    DecodeError,
    ForbiddenError,
    KommoError,
    NotFoundError,
    PaymentRequiredError,
    RateLimitError,
    ServerError,
    TalkAlreadyClosedError,
    TokenRefreshError,
    TokenStoreError,
    TransportError,
    UnauthorizedError,
)
from .models import CloseOutcome, CloseStatus, EntityRef, Talk, TalkEmbedded
from .oauth import OAuth2
from .ratelimit import RateLimiter, SlidingWindowRateLimiter
from .retry import RetryPolicy
from .stats import ClientStats
from .stores import FileTokenStore, MemoryTokenStore, TokenStore
from .tokens import TokenSet

__all__ = [
    "APIError",
    "Account",
    "AccountNotInstalledError",
    "AccountStore",
    "ClientClosedError",
    "ClientStats",
    "CloseOutcome",
    "CloseStatus",
    "CoordinationError",
    "DecodeError",
    "EntityRef",
    "FileAccountStore",
    "FileTokenStore",
    "ForbiddenError",
    "KommoAccounts",
    "KommoClient",
    "KommoError",
    "LongLivedToken",
    "MemoryAccountStore",
    "MemoryTokenStore",
    "NotFoundError",
    "OAuth2",
    "PaymentRequiredError",
    "RateLimitError",
    "RateLimiter",
    "RetryPolicy",
    "ServerError",
    "SlidingWindowRateLimiter",
    "Talk",
    "TalkAlreadyClosedError",
    "TalkEmbedded",
    "TokenRefreshError",
    "TokenSet",
    "TokenStore",
    "TokenStoreError",
    "TransportError",
    "UnauthorizedError",
    "__version__",
    "converter",
]
