"""Shared helpers of the batch benchmarks: a fast Talks API stand-in in its own process.

The stand-in answers like Kommo for the two routes a batch uses, as cheaply as
aiohttp allows (its low-level server, no routing, no middlewares), so that the
client side is what a benchmark measures:

- ``GET /api/v4/talks/{id}``: the API reference's example talk with that ID
  (HAL JSON with ``_links`` and ``_embedded``), for any ID;
- ``POST /api/v4/talks/{id}/close``: 202, always (every close succeeds, so
  one talk can be closed many times), or the ``close_answer`` given to
  :class:`ServerProcess` (a failure, for benchmarks of failed batches).

It runs in a child process (``multiprocessing``, spawn), optionally pinned to
one CPU, and reports the CPU time it used when stopped, so a benchmark can
tell whether the server, not the client, was the bottleneck.

For listings, :class:`ListingServer` runs a ``FakeKommo`` holding many talks
in a child process. :class:`Raw` and :func:`raw_pages` are the baselines the
SDK is compared with: plain aiohttp and ``json.loads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson

TOKEN = "bench-long-lived-token"
CLOSE_BODY = b'{"force_close":true}'
PAGE_SIZE = 250

_TALKS_PREFIX = "/api/v4/talks/"


def pin_to_cpu(cpu: int | None) -> str:
    """Pin this process to ``cpu`` if the platform allows; say what happened."""
    if cpu is None:
        return "not pinned"
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity here)"
    available = sorted(os.sched_getaffinity(0))
    if cpu not in available or len(available) < 2:
        return f"not pinned (CPUs available: {available})"
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


CloseAnswer = tuple[int, str, bytes]
"""A close's answer: status, Content-Type, body."""


def _serve(conn: Connection, cpu: int | None, close_answer: CloseAnswer | None) -> None:
    pinned = pin_to_cpu(cpu)
    asyncio.run(_serve_async(conn, pinned, close_answer))


async def _serve_async(conn: Connection, pinned: str, close_answer: CloseAnswer | None) -> None:
    # Imported here: a client process importing this module need not load them.
    from aiohttp import web

    from kommo_talks.testing._fake import example_talk, talk_payload

    base = ""
    answered = 0
    accepted = {"GET", "POST"}
    auth_header = f"Bearer {TOKEN}"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        if request.headers.get("Authorization") != auth_header:
            return web.Response(status=401)
        path = request.path
        if request.method not in accepted or not path.startswith(_TALKS_PREFIX):
            return web.Response(status=404)
        rest = path[len(_TALKS_PREFIX) :]
        if request.method == "POST":
            await request.read()
            if close_answer is not None:
                status, content_type, body = close_answer
                return web.Response(status=status, body=body, content_type=content_type)
            return web.Response(status=202)
        if not rest.isdigit():
            return web.Response(status=404)
        return web.Response(
            body=orjson.dumps(talk_payload(base, int(rest), example_talk(int(rest)))),
            content_type="application/hal+json",
        )

    server = web.Server(handler, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0, backlog=1024)
    port = listener.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    conn.send((base, pinned))
    # Serve until the parent says "stop" (or goes away); answer "usage" with the
    # CPU time used and the requests answered so far.
    while True:
        message = await loop.run_in_executor(None, _receive, conn)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with contextlib.suppress(OSError):
            conn.send((usage.ru_utime + usage.ru_stime, answered))
        if message != "usage":
            break
    listener.close()
    await server.shutdown(1.0)


def _receive(conn: Connection) -> object:
    try:
        return conn.recv()
    except EOFError:
        return None


class ServerProcess:
    """The stand-in server in a child process.

    ``with ServerProcess(cpu=1) as server:`` starts it; ``server.url`` and
    ``server.token`` address it; :meth:`cpu_seconds` reads its CPU time and
    request count so far. ``close_answer`` (status, Content-Type, body)
    replaces the 202 of every close.
    """

    def __init__(self, cpu: int | None = None, close_answer: CloseAnswer | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, cpu, close_answer), daemon=True)
        self.url = ""
        self.token = TOKEN
        self.pinned = ""

    def __enter__(self) -> ServerProcess:
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("the benchmark server did not start")
        self.url, self.pinned = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
            self._conn.poll(5)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def cpu_seconds(self) -> tuple[float, int]:
        """(CPU seconds used, requests answered) by the server so far."""
        self._conn.send("usage")
        return self._conn.recv()  # type: ignore[no-any-return]


@contextlib.contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Measure wall and CPU time of the block: ``{"wall": s, "cpu": s}`` once it ends."""
    result: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        result["wall"] = time.perf_counter() - wall
        result["cpu"] = time.process_time() - cpu


def current_rss_kib() -> int:
    """Resident set size now, in KiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:
        return 0


def peak_rss_kib() -> int:
    """The process's peak resident set size so far, in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


class Raw:
    """The baseline of single requests: plain aiohttp and ``json.loads``."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.talks = f"{base}/api/v4/talks/"
        self.get_headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.post_headers = {**self.get_headers, "Content-Type": "application/json"}

    async def get(self, talk_id: int) -> None:
        """``GET /api/v4/talks/{id}`` and ``json.loads`` of the body."""
        async with self.session.get(f"{self.talks}{talk_id}", headers=self.get_headers) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"GET answered {r.status}")
        json.loads(body)

    async def close(self, talk_id: int) -> None:
        """``POST /api/v4/talks/{id}/close`` with ``force_close``."""
        async with self.session.post(
            f"{self.talks}{talk_id}/close", data=CLOSE_BODY, headers=self.post_headers
        ) as r:
            await r.read()
            if r.status != 202:
                raise RuntimeError(f"POST answered {r.status}")


async def raw_pages(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    *,
    pages: int | None = None,
    loads: Callable[[bytes], Any] = json.loads,
    decode: Callable[[list[Any]], object] | None = None,
) -> int:
    """The baseline of listings: follow ``_links.next.href`` by hand, ``loads`` each page.

    Stops after ``pages`` pages if given; with ``decode`` (a control), each
    page's talks are also handed to it. Returns the number of talks seen.
    """
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    url: str | None = f"{base}/api/v4/talks?page=1&limit={PAGE_SIZE}"
    count = fetched = 0
    while url is not None and (pages is None or fetched < pages):
        async with session.get(url, headers=headers) as response:
            if response.status == 204:
                break
            response.raise_for_status()
            data = loads(await response.read())
        fetched += 1
        talks = data["_embedded"]["talks"]
        if decode is not None:
            decode(talks)
        for _talk in talks:
            count += 1
        if not talks:
            break
        link = data.get("_links", {}).get("next")
        url = link["href"] if link else None
    return count


def _serve_listing(conn: Connection, talks: int) -> None:
    asyncio.run(_serve_listing_async(conn, talks))


async def _serve_listing_async(conn: Connection, talks: int) -> None:
    from kommo_talks.testing import FakeKommo

    async with FakeKommo(talks=range(1, talks + 1), record=False) as fake:
        conn.send((fake.url, fake.token))
        # Serve until the parent says stop (or goes away).
        await asyncio.get_running_loop().run_in_executor(None, _receive, conn)


class ListingServer:
    """A ``FakeKommo`` holding ``talks`` talks, in a child process.

    ``with ListingServer(10_000) as server:`` starts it; ``server.url`` and
    ``server.token`` address it.
    """

    def __init__(self, talks: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_listing, args=(child, talks), daemon=True)
        self.url = ""
        self.token = ""

    def __enter__(self) -> ListingServer:
        self._process.start()
        if not self._conn.poll(30):
            raise RuntimeError("the listing server did not start")
        self.url, self.token = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
