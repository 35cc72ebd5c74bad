"""Benchmarks of kommo_talks.webhooks: parsing cost and receiver throughput.

Run ``python benchmarks/bench_webhooks.py`` from the repository root. It prints:

1. ``parse_webhook`` on a one-event ``talk[update]`` body (about 640 bytes)
   against ``urllib.parse.parse_qsl`` on the same bytes. Target: at most 2x.
2. Deliveries per second through a ``WebhookReceiver`` with a no-op callback
   against a bare aiohttp handler that answers 200. The servers run in this
   process; the load comes from a separate process (this script with
   ``--load``), a minimal keep-alive HTTP/1.1 client on loopback, so that the
   server and not the client is the bottleneck. Target: at least 0.8x.
   The bare handler neither reads the body nor schedules work, so the ratio
   holds the whole cost of a delivery (read, parse, hand-off to a worker).
   Two reference handlers put it in proportion: one only reads the body, the
   other decodes it with aiohttp's own ``await request.post()`` (a
   ``MultiDict`` of strings: no validation, no types, no events). Server CPU
   per delivery is printed too: on a shared machine it varies less than the
   rate does.
3. The same through ``receiver.asgi_app()`` under uvicorn (h11) against a
   bare ASGI app that answers 200 (no target: it shows what the ASGI
   adapter costs on top of the server).

Numbers depend on the machine; compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from aiohttp import web

from kommo_talks.testing._fake import example_talk
from kommo_talks.testing._webhooks import Sender, talk_event_body
from kommo_talks.webhooks import WebhookEvent, WebhookReceiver, parse_webhook

PATH = "/hook"
SCRIPT = str(Path(__file__).resolve())
REQUESTS = 5_000
WARMUP = 500
CONNECTIONS = 16
ROUNDS = 3

# What FakeKommo posts when it closes a talk: brackets percent-encoded, as a
# form encoder (PHP's http_build_query) sends them; and the same pairs with
# brackets as written in Kommo's documentation.
SENDER = Sender(17029541, "example", "https://example.kommo.com")
CLOSED_TALK = {**example_talk(117), "is_in_work": False}
ENCODED_BODY_BYTES = talk_event_body("update", [CLOSED_TALK], sender=SENDER)
RAW_BODY_BYTES = "&".join(
    f"{key}={quote_plus(value)}" for key, value in parse_qsl(ENCODED_BODY_BYTES.decode())
).encode()


# ------------------------------------------------------------------- parsing


def per_call_us(func: Callable[[], object], number: int = 20_000, repeat: int = 7) -> float:
    """Best of ``repeat`` runs, in microseconds per call."""
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def bench_parse() -> None:
    print("1. parse_webhook vs urllib.parse.parse_qsl, one talk[update] event")
    for label, body in (("raw brackets", RAW_BODY_BYTES), ("%5B-encoded", ENCODED_BODY_BYTES)):
        if len(parse_webhook(body).events) != 1:
            raise RuntimeError("the benchmark body does not hold one event")
        baseline = per_call_us(partial(parse_qsl, body))
        ours = per_call_us(partial(parse_webhook, body))
        print(
            f"   {label:<13} {len(body):4d} bytes: parse_qsl {baseline:6.1f} us, "
            f"parse_webhook {ours:6.1f} us, ratio {ours / baseline:.2f}x (target <= 2x)"
        )


# ---------------------------------------------------------------- throughput


async def start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def pin(cpu: int) -> str:
    """Pin this process to one CPU where the OS allows it; say what was done."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return "not pinned"
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})
    return f"CPU {cpus[cpu % len(cpus)]}"


def distinct_body(n: int) -> bytes:
    """The benchmark body with the talk's ``updated_at`` moved ``n`` seconds: a new event."""
    talk = {**CLOSED_TALK, "updated_at": CLOSED_TALK["updated_at"] + n}
    return talk_event_body("update", [talk], sender=SENDER)


async def run_load(port: int, requests: int, *, first: int | None = None) -> tuple[float, float]:
    """Run the load process against ``port``.

    By default every request carries ``ENCODED_BODY_BYTES``; with ``first``,
    request ``i`` carries ``distinct_body(first + i)`` (bodies made before
    the clock starts). Returns the deliveries per second and this (server)
    process's CPU time per delivery in microseconds.
    """
    cpu_before = time.process_time()
    extra = [] if first is None else ["--first", str(first)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--load",
        str(port),
        str(requests),
        *extra,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load process failed with status {process.returncode}")
    result = json.loads(out)
    if result["ok"] != requests:
        raise RuntimeError(f"only {result['ok']} of {requests} deliveries got 200")
    return float(result["per_second"]), (time.process_time() - cpu_before) / requests * 1e6


async def bench_receiver() -> None:
    print(
        f"2. deliveries/s, {REQUESTS} POSTs over {CONNECTIONS} keep-alive connections "
        f"from another process, best of {ROUNDS} (server CPU: least per delivery)"
    )
    handled = 0

    async def noop(event: WebhookEvent) -> None:
        nonlocal handled
        handled += 1

    async def bare(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def read_only(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200)

    async def aiohttp_form(request: web.Request) -> web.Response:
        await request.post()
        return web.Response(status=200)

    receiver = WebhookReceiver(noop)
    apps: dict[str, web.Application] = {}
    for label, handler in (
        ("bare aiohttp handler", bare),
        ("reference: reads body", read_only),
        ("reference: request.post()", aiohttp_form),
    ):
        apps[label] = web.Application()
        apps[label].router.add_post(PATH, handler)
    apps["WebhookReceiver (no-op)"] = web.Application()
    receiver.setup(apps["WebhookReceiver (no-op)"], PATH)
    servers = {label: await start(app) for label, app in apps.items()}
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in apps}
    try:
        for _, port in servers.values():
            await run_load(port, WARMUP)
        for _ in range(ROUNDS):  # interleaved, so that drifting load hits all alike
            for label, (_, port) in servers.items():
                runs[label].append(await run_load(port, REQUESTS))
    finally:
        for runner, _ in servers.values():
            await runner.cleanup()  # the receiver's drains: every accepted callback ran
    if handled != WARMUP + ROUNDS * REQUESTS:
        raise RuntimeError(f"the callback ran {handled} times")
    best = {
        label: (max(rate for rate, _ in results), min(cpu for _, cpu in results))
        for label, results in runs.items()
    }
    for label, (rate, cpu) in best.items():
        print(f"   {label:<26} {rate:8.0f} /s, server CPU {cpu:6.1f} us/delivery")
    bare_rate, bare_cpu = best["bare aiohttp handler"]
    ours_rate, ours_cpu = best["WebhookReceiver (no-op)"]
    print(
        f"   ratio {ours_rate / bare_rate:.2f}x (target >= 0.8x); "
        f"by server CPU {bare_cpu / ours_cpu:.2f}x"
    )


async def bare_asgi(scope: dict[str, object], receive: object, send: Any) -> None:
    """The ASGI baseline: answers 200 without reading the body."""
    headers = [(b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def start_asgi(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", http="h11")
    server = uvicorn.Server(config)
    return server, asyncio.create_task(server.serve(sockets=[sock])), sock.getsockname()[1]


async def bench_asgi() -> None:
    print(f"3. under uvicorn (h11): a bare ASGI app vs receiver.asgi_app(), best of {ROUNDS}")
    handled = 0

    async def noop(event: WebhookEvent) -> None:
        nonlocal handled
        handled += 1

    receiver = WebhookReceiver(noop)
    apps = {"bare ASGI app": bare_asgi, "WebhookReceiver ASGI (no-op)": receiver.asgi_app()}
    servers = {label: await start_asgi(app) for label, app in apps.items()}
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in apps}
    try:
        for _, _, port in servers.values():
            await run_load(port, WARMUP)
        for _ in range(ROUNDS):
            for label, (_, _, port) in servers.items():
                runs[label].append(await run_load(port, REQUESTS))
    finally:
        for server, task, _ in servers.values():
            server.should_exit = True
            await task
        await receiver.close()
    if handled != WARMUP + ROUNDS * REQUESTS:
        raise RuntimeError(f"the callback ran {handled} times")
    best = {label: (max(r for r, _ in res), min(c for _, c in res)) for label, res in runs.items()}
    for label, (rate, cpu) in best.items():
        print(f"   {label:<28} {rate:8.0f} /s, server CPU {cpu:6.1f} us/delivery")
    (bare_rate, bare_cpu), (ours_rate, ours_cpu) = best.values()
    print(f"   ratio {ours_rate / bare_rate:.2f}x; by server CPU {bare_cpu / ours_cpu:.2f}x")


# ---------------------------------------------------------- the load process


def request_bytes(port: int, body: bytes) -> bytes:
    """One complete HTTP/1.1 POST of ``body`` to PATH."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def load(port: int, requests: int, first: int | None = None) -> dict[str, float]:
    """Send ``requests`` POSTs over CONNECTIONS keep-alive connections.

    The same body each time, or with ``first`` distinct bodies (see ``run_load``).
    """
    if first is None:
        same = request_bytes(port, ENCODED_BODY_BYTES)
        payloads = [same] * requests
    else:
        payloads = [request_bytes(port, distinct_body(first + n)) for n in range(requests)]
    left = requests
    ok = 0

    async def worker() -> None:
        nonlocal left, ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(payloads[left])
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if status_line.split(b" ", 2)[1] == b"200":
                    ok += 1
        finally:
            writer.close()
            await writer.wait_closed()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    elapsed = time.perf_counter() - began
    return {"ok": ok, "per_second": requests / elapsed}


def main() -> None:
    """Run both benchmarks (or, with ``--load PORT N``, be the load process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        pin(1)
        print(json.dumps(asyncio.run(load(*args.load, args.first))))
        return
    where = pin(0)
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; server {where}, load on another"
    )
    bench_parse()
    asyncio.run(bench_receiver())
    asyncio.run(bench_asgi())


if __name__ == "__main__":
    main()
