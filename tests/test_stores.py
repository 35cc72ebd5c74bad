"""TokenSet, and the token stores: memory, file (atomic, 0600) and the file refresh lock."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from kommo_talks.errors import DecodeError, TokenStoreError
from kommo_talks.stores import FileTokenStore, MemoryTokenStore, TokenStore
from kommo_talks.tokens import TokenSet

ACCESS = "ACCESS-0123456789-secret"
REFRESH = "REFRESH-9876543210-secret"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
TOKENS = TokenSet(ACCESS, REFRESH, NOW + timedelta(days=1))
NEWER = TokenSet("ACCESS-2-secret", "REFRESH-2-secret", NOW + timedelta(days=2))

ROOT = Path(__file__).resolve().parents[1]
# Generous bounds for waits that end as soon as the awaited thing happens.
BOUND = 30.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_no_secret(text: str) -> None:
    for secret in (ACCESS, REFRESH, "secret"):
        assert secret not in text


# --- TokenSet ---------------------------------------------------------------


def test_repr_and_str_hide_both_tokens() -> None:
    for text in (repr(TOKENS), str(TOKENS), f"{TOKENS}", repr([TOKENS])):
        _assert_no_secret(text)
        assert "access_token='***'" in text
        assert "refresh_token='***'" in text
        assert "expires_at=" in text


def test_naive_expires_at_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TokenSet(ACCESS, REFRESH, datetime(2026, 11, 27, 10, 0))


@pytest.mark.parametrize(
    ("access", "error"),
    [(b"ACCESS-bytes-secret", TypeError), (12345, TypeError), ("", ValueError)],
)
def test_bad_token_is_rejected_without_quoting_it(access: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="access_token") as info:
        TokenSet(access, REFRESH, NOW)
    _assert_no_secret(str(info.value))
    assert "12345" not in str(info.value)


def test_expires_within_compares_with_the_given_now() -> None:
    tokens = TokenSet(ACCESS, REFRESH, NOW + timedelta(seconds=60))
    assert tokens.expires_within(60, now=NOW)
    assert not tokens.expires_within(59, now=NOW)
    assert tokens.expires_within(0, now=NOW + timedelta(seconds=61))  # already expired
    # Any timezone will do, as long as it is one.
    assert tokens.expires_within(60, now=NOW.astimezone(timezone(timedelta(hours=3))))


def test_expires_within_defaults_to_the_current_time() -> None:
    assert TokenSet(ACCESS, REFRESH, datetime.now(UTC) + timedelta(seconds=30)).expires_within(60)
    assert not TokenSet(ACCESS, REFRESH, datetime.now(UTC) + timedelta(hours=1)).expires_within(60)


def test_expires_within_rejects_a_naive_now() -> None:
    with pytest.raises(ValueError, match="now"):
        TOKENS.expires_within(60, now=datetime(2026, 11, 27))


def _answer(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "expires_in": 86400,
        "server_time": 1764237600,
        "access_token": ACCESS,
        "refresh_token": REFRESH,
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not _MISSING}


_MISSING = object()


def test_from_token_response_sets_expiry_from_now() -> None:
    tokens = TokenSet.from_token_response(_answer(), now=NOW)
    assert tokens == TokenSet(ACCESS, REFRESH, NOW + timedelta(seconds=86400))


def test_from_token_response_accepts_any_case_of_bearer() -> None:
    assert TokenSet.from_token_response(_answer(token_type="bearer"), now=NOW) == TokenSet(
        ACCESS, REFRESH, NOW + timedelta(days=1)
    )


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"token_type": _MISSING}, "token_type"),
        ({"token_type": "mac"}, "token_type"),
        ({"token_type": None}, "token_type"),
        ({"expires_in": _MISSING}, "expires_in"),
        ({"expires_in": "86400"}, "expires_in"),
        ({"expires_in": 86400.0}, "expires_in"),
        ({"expires_in": True}, "expires_in"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -5}, "expires_in"),
        ({"access_token": _MISSING}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": 12345}, "access_token"),
        ({"refresh_token": _MISSING}, "refresh_token"),
        ({"refresh_token": None}, "refresh_token"),
        ({"refresh_token": ["REFRESH-in-a-list-secret"]}, "refresh_token"),
    ],
)
def test_from_token_response_names_the_bad_field_and_no_token(
    changes: dict[str, Any], path: str
) -> None:
    with pytest.raises(DecodeError) as info:
        TokenSet.from_token_response(_answer(**changes), now=NOW, status=200)
    error = info.value
    assert error.path == path
    assert error.status == 200
    assert path in str(error)
    assert "HTTP 200" in str(error)
    _assert_no_secret(str(error))
    assert "12345" not in str(error)


@pytest.mark.parametrize("body", [[], "Bearer", None, 17])
def test_from_token_response_rejects_a_body_that_is_not_an_object(body: Any) -> None:
    with pytest.raises(DecodeError, match="not a JSON object") as info:
        TokenSet.from_token_response(body, now=NOW)
    assert info.value.path is None
    assert info.value.status is None


def test_from_token_response_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="now"):
        TokenSet.from_token_response(_answer(), now=datetime(2026, 11, 27))


def test_json_form_is_iso_8601_utc_and_round_trips() -> None:
    tokens = TokenSet(ACCESS, REFRESH, datetime(2026, 11, 28, 10, 0, 0, 250000, tzinfo=UTC))
    assert tokens.to_json() == {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_at": "2026-11-28T10:00:00.250000+00:00",
    }
    assert TokenSet.from_json(json.loads(json.dumps(tokens.to_json()))) == tokens
    assert TOKENS.to_json()["expires_at"] == "2026-11-28T10:00:00+00:00"


def test_json_form_is_written_in_utc_and_read_back_in_utc() -> None:
    moscow = timezone(timedelta(hours=3))
    tokens = TokenSet(ACCESS, REFRESH, datetime(2026, 11, 28, 13, 0, tzinfo=moscow))
    assert tokens.to_json()["expires_at"] == "2026-11-28T10:00:00+00:00"
    record = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_at": "2026-11-28T10:00Z"}
    loaded = TokenSet.from_json({**record, "added_later": 1})
    assert loaded == tokens
    assert loaded.expires_at.utcoffset() == timedelta(0)


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {**TOKENS.to_json(), **changes}
    return {key: value for key, value in record.items() if value is not _MISSING}


@pytest.mark.parametrize(
    ("record", "key"),
    [
        (_record(access_token=_MISSING), "access_token"),
        (_record(refresh_token=_MISSING), "refresh_token"),
        (_record(refresh_token=5), "refresh_token"),
        (_record(refresh_token=""), "refresh_token"),
        (_record(expires_at=_MISSING), "expires_at"),
        (_record(expires_at=1764324000), "expires_at"),
        (_record(expires_at="tomorrow"), "expires_at"),
        (_record(expires_at="2026-11-28T10:00:00"), "expires_at"),
    ],
)
def test_from_json_names_the_bad_key_and_no_token(record: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        TokenSet.from_json(record)
    _assert_no_secret(str(info.value))


# --- MemoryTokenStore ---------------------------------------------------------


async def test_memory_store_keeps_what_was_saved() -> None:
    store = MemoryTokenStore()
    assert await store.load() is None
    await store.save(TOKENS)
    assert await store.load() == TOKENS
    assert await MemoryTokenStore(NEWER).load() == NEWER
    _assert_no_secret(repr(store))


def test_both_stores_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(MemoryTokenStore(), TokenStore)
    assert isinstance(FileTokenStore(tmp_path / "tokens.json"), TokenStore)
    assert not isinstance(object(), TokenStore)


# --- FileTokenStore: reading and writing --------------------------------------


async def test_missing_file_loads_as_none(tmp_path: Path) -> None:
    assert await FileTokenStore(tmp_path / "tokens.json").load() is None


async def test_saved_pair_loads_through_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    await FileTokenStore(path).save(TOKENS)
    assert await FileTokenStore(path).load() == TOKENS
    assert await FileTokenStore(str(path)).load() == TOKENS
    assert json.loads(path.read_text()) == TOKENS.to_json()


async def test_file_is_private_after_every_save(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    await store.save(TOKENS)
    assert _mode(path) == 0o600
    path.chmod(0o644)  # someone widened it: the next save replaces the file
    await store.save(NEWER)
    assert _mode(path) == 0o600
    assert await store.load() == NEWER


async def test_save_leaves_nothing_but_the_file(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "tokens.json")
    await store.save(TOKENS)
    await store.save(NEWER)
    assert _names(tmp_path) == ["tokens.json"]


async def test_file_io_runs_off_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    real_replace = os.replace

    def spying_replace(*args: Any, **kwargs: Any) -> None:
        threads.append(threading.get_ident())
        real_replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", spying_replace)
    await FileTokenStore(tmp_path / "tokens.json").save(TOKENS)
    assert threads
    assert threading.get_ident() not in threads


@pytest.mark.parametrize("failing", ["fsync", "replace"])
async def test_interrupted_save_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "tokens.json"
    store = FileTokenStore(path)
    await store.save(TOKENS)
    before = path.read_bytes()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, failing, broken)
        with pytest.raises(TokenStoreError, match="cannot write token file") as info:
            await store.save(NEWER)

    assert str(path) in str(info.value)
    _assert_no_secret(str(info.value))
    assert path.read_bytes() == before
    assert await FileTokenStore(path).load() == TOKENS
    assert _names(tmp_path) == ["tokens.json"]


async def test_save_into_a_missing_folder_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "tokens.json"
    with pytest.raises(TokenStoreError, match="cannot write token file") as info:
        await FileTokenStore(path).save(TOKENS)
    assert str(path) in str(info.value)


# Corrupt files: tests/test_stores_corrupt.py (with the Redis store's corrupt values).


async def test_folder_at_the_path_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.mkdir()
    with pytest.raises(TokenStoreError, match="cannot read token file") as info:
        await FileTokenStore(path).load()
    assert str(path) in str(info.value)


async def test_file_without_permission_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens.json"
    await FileTokenStore(path).save(TOKENS)
    real_open = open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:  # chmod 000 would not stop root, so refuse here
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(TokenStoreError, match="Permission denied") as info:
        await FileTokenStore(path).load()
    assert str(path) in str(info.value)


async def test_save_replaces_a_corrupt_file(tmp_path: Path) -> None:
    # How a user recovers: OAuth2.exchange_code saves whatever the file held.
    path = tmp_path / "tokens.json"
    path.write_bytes(b"garbage")
    store = FileTokenStore(path)
    await store.save(TOKENS)
    assert await store.load() == TOKENS


def test_repr_names_the_file_only(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "tokens.json")
    assert repr(store) == f"FileTokenStore({str(tmp_path / 'tokens.json')!r})"
    assert store.lock_path == tmp_path / "tokens.json.lock"


def test_negative_lock_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        FileTokenStore(tmp_path / "tokens.json", lock_timeout=-1)


# --- FileTokenStore: the refresh lock -----------------------------------------

_CHILD_TRIES = """
import asyncio, sys
from kommo_talks.errors import TokenStoreError
from kommo_talks.stores import FileTokenStore

async def main():
    try:
        async with FileTokenStore(sys.argv[1], lock_timeout=float(sys.argv[2])).refresh_lock():
            print("acquired")
    except TokenStoreError:
        print("timed out")

asyncio.run(main())
"""

_CHILD_HOLDS = """
import asyncio, sys
from kommo_talks.stores import FileTokenStore

async def main():
    async with FileTokenStore(sys.argv[1]).refresh_lock():
        print("held", flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""


def _child_env() -> dict[str, str]:
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def _child_tries(path: Path, lock_timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD_TRIES,
        str(path),
        str(lock_timeout),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def _hold(store: FileTokenStore, entered: asyncio.Event, leave: asyncio.Event) -> None:
    async with store.refresh_lock():
        entered.set()
        await leave.wait()


async def _yield_to_others() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_another_process_cannot_take_the_lock_while_held(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    async with FileTokenStore(path).refresh_lock():
        assert await _child_tries(path, 0.2) == "timed out"
    assert await _child_tries(path, BOUND) == "acquired"


async def test_lock_waits_for_another_process_to_let_go(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD_HOLDS,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=_child_env(),
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), BOUND) == b"held\n"

        with pytest.raises(TokenStoreError, match="timed out") as info:
            async with FileTokenStore(path, lock_timeout=0).refresh_lock():
                pytest.fail("entered a lock that another process holds")
        assert str(path) in str(info.value)

        entered, leave = asyncio.Event(), asyncio.Event()
        waiter = asyncio.create_task(_hold(FileTokenStore(path), entered, leave))
        await _yield_to_others()
        assert not entered.is_set()

        proc.stdin.write(b"release\n")
        await proc.stdin.drain()
        await asyncio.wait_for(entered.wait(), BOUND)
        leave.set()
        await waiter
    finally:
        if proc.returncode is None:
            proc.stdin.close()
        await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 0


async def test_tasks_of_one_process_take_turns(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "tokens.json")
    order: list[str] = []
    first_in, first_may_leave = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with store.refresh_lock():
            order.append("first in")
            first_in.set()
            await first_may_leave.wait()
            order.append("first out")

    async def second() -> None:
        await first_in.wait()
        async with store.refresh_lock():
            order.append("second in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await first_in.wait()
    await _yield_to_others()
    assert order == ["first in"]
    first_may_leave.set()
    await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    assert order == ["first in", "first out", "second in"]


async def test_two_stores_on_one_file_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    async with FileTokenStore(path).refresh_lock():
        with pytest.raises(TokenStoreError, match="timed out"):
            async with FileTokenStore(path, lock_timeout=0).refresh_lock():
                pytest.fail("two holders at once")
    async with FileTokenStore(path, lock_timeout=0).refresh_lock():
        pass


async def test_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "tokens.json", lock_timeout=0)
    with pytest.raises(RuntimeError, match="boom"):
        async with store.refresh_lock():
            raise RuntimeError("boom")
    async with store.refresh_lock():
        pass
    async with FileTokenStore(store.path, lock_timeout=0).refresh_lock():
        pass


async def test_cancelled_waiter_leaves_the_lock_free(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    waiting_store = FileTokenStore(path)
    entered, leave = asyncio.Event(), asyncio.Event()
    async with FileTokenStore(path).refresh_lock():
        waiter = asyncio.create_task(_hold(waiting_store, entered, leave))
        await _yield_to_others()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert not entered.is_set()
    # Free for this process (the store's task lock) and for others (the file lock).
    async with waiting_store.refresh_lock():
        pass
    assert await _child_tries(path, BOUND) == "acquired"


async def test_waiter_cancelled_while_its_try_succeeds_gives_the_lock_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import filelock

    trying, may_finish = threading.Event(), threading.Event()
    # Kept alive here, so that only an explicit release (not garbage collection
    # of an abandoned lock object) can free the lock.
    lock_objects: list[Any] = []

    class GatedFileLock(filelock.FileLock):
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            lock_objects.append(self)
            trying.set()
            may_finish.wait(BOUND)
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", GatedFileLock)
    path = tmp_path / "tokens.json"
    entered, leave = asyncio.Event(), asyncio.Event()
    waiter = asyncio.create_task(_hold(FileTokenStore(path), entered, leave))
    assert await asyncio.to_thread(trying.wait, BOUND)
    waiter.cancel()  # while the try runs in its thread; it will succeed
    may_finish.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not entered.is_set()
    # The lock taken by the abandoned try is given back as soon as it lands.
    async with FileTokenStore(path, lock_timeout=BOUND).refresh_lock():
        pass


@pytest.fixture
def lock_path_is_a_folder(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    Path(f"{path}.lock").mkdir()
    return path


async def test_unusable_lock_file_raises_token_store_error(lock_path_is_a_folder: Path) -> None:
    path = lock_path_is_a_folder
    with pytest.raises(TokenStoreError, match="refresh lock file") as info:
        async with FileTokenStore(path).refresh_lock():
            pytest.fail("entered without a lock")
    assert str(path) in str(info.value)


def test_importing_the_stores_does_not_import_filelock() -> None:
    import subprocess

    code = "import sys, kommo_talks.stores; print('filelock' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), check=True
    )
    assert out.stdout.strip() == "False"
