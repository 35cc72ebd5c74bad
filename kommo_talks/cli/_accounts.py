"""``kommo-talks accounts list|remove``: the installed accounts of a public integration."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import NoReturn

import click

from ..accounts import AccountStore, FileAccountStore
from ..errors import KommoError
from ._app import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, run
from ._text import printable

__all__ = ["accounts"]


@contextlib.asynccontextmanager
async def _opened(store_dir: str | None, redis_url: str | None) -> AsyncIterator[AccountStore]:
    if (store_dir is None) == (redis_url is None):
        raise CLIError("give exactly one of --store DIR and --redis-url URL", EXIT_USAGE)
    if store_dir is not None:
        yield FileAccountStore(store_dir)
        return
    try:
        import redis.asyncio
    except ImportError:
        raise CLIError(
            "--redis-url needs the redis extra: pip install 'kommo-talks[redis]'", EXIT_USAGE
        ) from None
    from ..accounts import RedisAccountStore

    connection = redis.asyncio.Redis.from_url(str(redis_url))
    try:
        yield RedisAccountStore(connection)
    finally:
        await connection.aclose()


def _store_options(function: click.decorators.FC) -> click.decorators.FC:
    function = click.option(
        "--redis-url", metavar="URL", help="A RedisAccountStore (key prefix 'kommo:')."
    )(function)
    return click.option("--store", "store_dir", metavar="DIR", help="A FileAccountStore folder.")(
        function
    )


@click.group()
def accounts() -> None:
    """The accounts that installed the integration (KommoAccounts' store)."""


@accounts.command(name="list")
@_store_options
def list_accounts(store_dir: str | None, redis_url: str | None) -> NoReturn:
    """Print the installed accounts: ID, subdomain, address, install time."""

    async def listing() -> int:
        async with _opened(store_dir, redis_url) as store:
            try:
                for account_id in await store.installed():
                    account = await store.get(account_id)
                    if account is not None:
                        click.echo(
                            f"{account.id}\t{printable(account.subdomain)}\t"
                            f"{printable(account.base_url)}\t{account.installed_at.isoformat()}"
                        )
            except KommoError as exc:
                raise CLIError(f"cannot list the accounts: {exc}") from None
        return EXIT_OK

    run(listing())


@accounts.command()
@click.argument("account_id", metavar="ID", type=click.IntRange(min=1))
@_store_options
def remove(account_id: int, store_dir: str | None, redis_url: str | None) -> NoReturn:
    """Delete an account's record and tokens (Kommo is not told: uninstall it there too)."""

    async def removing() -> int:
        async with _opened(store_dir, redis_url) as store:
            try:
                removed = await store.remove(account_id)
            except KommoError as exc:
                raise CLIError(f"cannot remove account {account_id}: {exc}") from None
        if not removed:
            raise CLIError(f"account {account_id} is not installed", EXIT_FAILED)
        click.echo(f"removed account {account_id}")
        return EXIT_OK

    run(removing())
