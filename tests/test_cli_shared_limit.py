"""The rate limit that ``kommo-talks`` commands of one account share through a file."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
from conftest import FakeClock
from test_cli import cli_env, kommo_talks

from kommo_talks.cli._shared_limit import (
    SharedWindowRateLimiter,
    cache_folder,
    limit_file,
    parse_send_times,
    plan_send,
)
from kommo_talks.testing import FakeKommo

# -- the decision, pure ---------------------------------------------------------------------


def test_a_free_slot_records_the_send_and_keeps_at_most_one_window() -> None:
    kept, wait = plan_send([9.0, 99.5, 99.8], now=100.0, size=3, span=1.0)

    assert wait == 0.0
    assert kept == [99.5, 99.8, 100.0]  # 9.0 is out of the window


def test_a_full_window_waits_until_its_oldest_send_leaves_it() -> None:
    kept, wait = plan_send([99.9, 99.2, 99.5], now=100.0, size=3, span=1.025)

    assert kept == []
    assert wait == pytest.approx(99.2 + 1.025 - 100.0)


def test_send_times_far_ahead_of_the_clock_are_ignored() -> None:
    # The wall clock stepped back by an hour: those times would block for an hour.
    kept, wait = plan_send([3700.0, 3700.1, 3700.2], now=100.0, size=3, span=1.0)

    assert (kept, wait) == ([100.0], 0.0)


@pytest.mark.parametrize(
    ("data", "times"),
    [
        (b"[1.5, 2, 3.25]", [1.5, 2.0, 3.25]),
        (b"", []),
        (b"{garbage", []),
        (b'{"sent": [1]}', []),
        (b"\xff\xfe", []),
        (b'[1, "2", null, true, 1e999, 4]', [1.0, 4.0]),
        (b"[" + b"1," * 40_000 + b"1]", []),  # larger than any limit file we write
    ],
)
def test_a_limit_file_is_read_leniently(data: bytes, times: list[float]) -> None:
    assert parse_send_times(data) == times


# -- where the file lives ------------------------------------------------------------------


def test_the_file_lives_in_the_xdg_cache_folder(tmp_path: Path) -> None:
    assert cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "kommo-talks"


def test_a_relative_xdg_cache_home_is_ignored() -> None:
    expected = Path.home() / ".cache" / "kommo-talks"
    assert cache_folder({"XDG_CACHE_HOME": "relative/cache"}) == expected
    assert cache_folder({}) == expected


def test_one_file_per_account_address(tmp_path: Path) -> None:
    one = limit_file("https://example.kommo.com", tmp_path)

    assert limit_file("https://example.kommo.com/", tmp_path) == one
    assert one.name.startswith("ratelimit-example.kommo.com-")
    assert limit_file("https://other.kommo.com", tmp_path) != one
    assert limit_file("http://127.0.0.1:8001", tmp_path) != limit_file(
        "http://127.0.0.1:8002", tmp_path
    )


def test_a_base_url_with_a_space_has_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spaces"):
        limit_file("https://exa mple.kommo.com", tmp_path)


# -- the limiter, with a fake clock ---------------------------------------------------------


def limiter(path: Path, clock: FakeClock, rate: float = 3) -> SharedWindowRateLimiter:
    return SharedWindowRateLimiter(path, rate, margin=0.0, clock=clock.now, sleep=clock.sleep)


async def test_two_processes_sharing_the_file_keep_one_window(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "cache" / "limit.json"
    first, second = limiter(path, fake_clock), limiter(path, fake_clock)

    for _ in range(3):
        await first.acquire()
    started = fake_clock.time
    await second.acquire()  # a new process: the window is already full

    assert fake_clock.time - started == pytest.approx(1.0)
    assert json.loads(path.read_bytes()) == [fake_clock.time]  # the first three left the window


async def test_the_file_never_holds_more_than_one_window(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    path = tmp_path / "limit.json"
    shared = limiter(path, fake_clock)

    sizes = []
    for _ in range(20):
        await shared.acquire()
        sizes.append(len(json.loads(path.read_bytes())))

    assert max(sizes) == 3
    assert fake_clock.time - 1000.0 == pytest.approx(6.0)  # 20 sends at 3 per second


async def test_a_corrupt_file_starts_a_fresh_window(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = tmp_path / "limit.json"
    path.write_bytes(b"\x00{not json")

    await limiter(path, fake_clock).acquire()

    assert fake_clock.sleeps == []
    assert json.loads(path.read_bytes()) == [fake_clock.time]


async def test_the_file_and_its_folder_are_private(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = tmp_path / "cache" / "kommo-talks" / "limit.json"
    path.parent.mkdir(parents=True)
    path.write_text("[]")
    path.chmod(0o644)

    await limiter(path, fake_clock).acquire()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_name("limit.json.lock").stat().st_mode) == 0o600


async def test_a_new_folder_is_private(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = tmp_path / "new" / "limit.json"

    await limiter(path, fake_clock).acquire()

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_symlink_is_not_followed_and_the_limit_still_holds(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "limit.json"
    path.symlink_to(target)
    warnings: list[str] = []
    shared = SharedWindowRateLimiter(
        path, 3, margin=0.0, clock=fake_clock.now, sleep=fake_clock.sleep, warn=warnings.append
    )

    for _ in range(4):
        await shared.acquire()

    assert target.read_text() == "keep me"
    assert len(warnings) == 1
    assert "limit.json" in warnings[0]
    assert "keeps the limit by itself" in warnings[0]
    assert fake_clock.time - 1000.0 == pytest.approx(1.0)  # the 4th send waited a window


async def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_in_process_limit(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    (tmp_path / "cache").write_text("a file where the folder should be")
    warnings: list[str] = []
    shared = SharedWindowRateLimiter(
        tmp_path / "cache" / "kommo-talks" / "limit.json",
        3,
        margin=0.0,
        clock=fake_clock.now,
        sleep=fake_clock.sleep,
        warn=warnings.append,
    )

    for _ in range(4):
        await shared.acquire()

    assert len(warnings) == 1
    assert fake_clock.time - 1000.0 == pytest.approx(1.0)


# -- the commands, end to end ---------------------------------------------------------------


async def test_back_to_back_close_commands_draw_no_429(tmp_path: Path) -> None:
    # 50 ms of slack in the fake's window for scheduling (the client keeps 1 s).
    async with FakeKommo(talks=range(1, 31), rate_limit=7, rate_window=0.95) as fake:
        env = cli_env(fake, XDG_CACHE_HOME=str(tmp_path))
        for first in (1, 11, 21):
            ids = [str(i) for i in range(first, first + 10)]
            result = await kommo_talks("close", *ids, "--force", env=env)
            assert result.code == 0, result.err

    assert fake.closed_talks() == list(range(1, 31))
    assert fake.stats.throttled == 0
    assert list((tmp_path / "kommo-talks").glob("ratelimit-127.0.0.1-*.json"))


async def test_concurrent_close_commands_share_the_limit(tmp_path: Path) -> None:
    async with FakeKommo(talks=range(1, 29), rate_limit=7, rate_window=0.95) as fake:
        env = cli_env(fake, XDG_CACHE_HOME=str(tmp_path))
        results = await asyncio.gather(
            kommo_talks("close", *map(str, range(1, 15)), "--force", env=env),
            kommo_talks("close", *map(str, range(15, 29)), "--force", env=env),
        )

    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    assert fake.closed_talks() == list(range(1, 29))
    assert fake.stats.throttled == 0


async def test_no_shared_limit_keeps_the_limit_per_process(tmp_path: Path) -> None:
    async with FakeKommo(talks=range(1, 29), rate_limit=7, rate_window=0.95) as fake:
        env = cli_env(fake, XDG_CACHE_HOME=str(tmp_path))
        await asyncio.gather(
            kommo_talks("close", *map(str, range(1, 15)), "--force", "--no-shared-limit", env=env),
            kommo_talks("close", *map(str, range(15, 29)), "--force", "--no-shared-limit", env=env),
        )

    # Two processes at 7/s each against one account's 7/s.
    assert fake.stats.throttled > 0
    assert not (tmp_path / "kommo-talks").exists()


async def test_an_unusable_cache_folder_warns_once_and_the_command_still_works(
    fake: FakeKommo, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    env = cli_env(fake, XDG_CACHE_HOME=str(not_a_folder))

    result = await kommo_talks("close", "1", "2", "3", "--force", env=env)

    assert result.code == 0, result.err
    assert fake.closed_talks() == [1, 2, 3]
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "keeps the limit by itself" in warnings[0]


@pytest.mark.parametrize("command", [["get", "1"], ["list"]])
async def test_get_and_list_share_the_limit_unless_told_not_to(
    fake: FakeKommo, tmp_path: Path, command: list[str]
) -> None:
    env = cli_env(fake, XDG_CACHE_HOME=str(tmp_path))
    folder = tmp_path / "kommo-talks"

    alone = await kommo_talks(*command, "--no-shared-limit", env=env)
    assert alone.code == 0, alone.err
    assert not folder.exists()

    shared = await kommo_talks(*command, env=env)
    assert shared.code == 0, shared.err
    (limit,) = folder.glob("ratelimit-*.json")
    assert len(json.loads(limit.read_bytes())) == 1  # its one request
