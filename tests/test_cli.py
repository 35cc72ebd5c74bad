"""The kommo-talks command line, run as a subprocess against a FakeKommo in this process."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import attrs
import orjson
import pytest

from kommo_talks.testing import FakeKommo, Fault

ROOT = Path(__file__).resolve().parent.parent
# The shared rate limit files of the commands run here: never the user's real cache.
CACHE_HOME = tempfile.mkdtemp(prefix="kommo-talks-test-cache-")
atexit.register(shutil.rmtree, CACHE_HOME, ignore_errors=True)


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


def cli_env(fake: FakeKommo | None = None, **changes: str | None) -> dict[str, str]:
    """An environment for the CLI: this checkout on PYTHONPATH, credentials of ``fake``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOMMO_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "160"
    env["KOMMO_TALKS_RETRY_BASE_DELAY"] = "0.001"  # no seconds of backoff in tests
    env["XDG_CACHE_HOME"] = CACHE_HOME
    if fake is not None:
        env["KOMMO_BASE_URL"] = fake.url
        env["KOMMO_TOKEN"] = fake.token
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


async def kommo_talks(*args: str, env: Mapping[str, str], stdin: bytes | None = None) -> Result:
    """Run ``python -m kommo_talks.cli ARGS``; the fake keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kommo_talks.cli",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def assert_one_line_error(result: Result, *parts: str) -> None:
    """stderr is a single ``error: ...`` line holding ``parts``, with no traceback."""
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: "), result.err
    for part in parts:
        assert part in lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- get ---------------------------------------------------------------------------------------


async def test_get_prints_a_talk_as_kommo_json(fake: FakeKommo) -> None:
    result = await kommo_talks("get", "5", "--json", env=cli_env(fake))

    assert result.code == 0, result.err
    talk = orjson.loads(result.out)
    assert talk["talk_id"] == 5
    assert talk["is_in_work"] is True
    assert fake.stats.by_route["get"] == 1


async def test_get_prints_a_table_by_default(fake: FakeKommo) -> None:
    result = await kommo_talks("get", "7", env=cli_env(fake))

    assert result.code == 0, result.err
    assert "talk_id" in result.out
    assert "open (in work)" in result.out


async def test_get_an_unknown_talk_is_one_line_and_exit_1(fake: FakeKommo) -> None:
    result = await kommo_talks("get", "999", env=cli_env(fake))

    assert result.code == 1
    assert_one_line_error(result, "talk 999", "404")


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "1.5"])
async def test_get_a_bad_id_is_a_usage_error(fake: FakeKommo, bad: str) -> None:
    result = await kommo_talks("get", "--", bad, env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, "is not a talk ID")
    assert fake.stats.requests == 0


# -- credentials and connection errors ----------------------------------------------------


async def test_missing_token_is_a_usage_error(fake: FakeKommo) -> None:
    result = await kommo_talks("get", "1", env=cli_env(fake, KOMMO_TOKEN=None))

    assert result.code == 2
    assert_one_line_error(result, "KOMMO_TOKEN", "--token-file")


async def test_missing_base_url_is_a_usage_error(fake: FakeKommo) -> None:
    result = await kommo_talks("close", "1", env=cli_env(fake, KOMMO_BASE_URL=None))

    assert result.code == 2
    assert_one_line_error(result, "KOMMO_BASE_URL is not set")


async def test_a_bad_base_url_is_a_usage_error(fake: FakeKommo) -> None:
    env = cli_env(fake, KOMMO_BASE_URL="http://example.kommo.com")
    result = await kommo_talks("get", "1", env=env)

    assert result.code == 2
    assert_one_line_error(result, "KOMMO_BASE_URL")


@pytest.mark.parametrize("command", [["get", "1"], ["close", "1"], ["list"]])
@pytest.mark.parametrize("where", ["inside", "before", "after"])
async def test_a_base_url_with_a_space_is_a_usage_error(
    fake: FakeKommo, command: list[str], where: str
) -> None:
    url = {
        "inside": "https://exa mple.kommo.com",
        "before": f" {fake.url}",
        "after": f"{fake.url} ",
    }
    result = await kommo_talks(*command, env=cli_env(fake, KOMMO_BASE_URL=url[where]))

    assert result.code == 2
    assert_one_line_error(result, "KOMMO_BASE_URL", "must not contain spaces")
    assert fake.stats.requests == 0


async def test_an_unreachable_host_is_one_line_and_nothing_is_closed() -> None:
    env = cli_env(KOMMO_BASE_URL=f"http://127.0.0.1:{closed_port()}", KOMMO_TOKEN="x")

    get = await kommo_talks("get", "1", env=env)
    close = await kommo_talks("close", "1", "2", "--force", env=env)

    assert get.code == 1
    assert_one_line_error(get, "cannot reach Kommo")
    assert close.code == 1
    assert_one_line_error(close, "nothing else was sent", "cannot reach Kommo")


async def test_a_wrong_token_is_one_line_and_nothing_is_closed(fake: FakeKommo) -> None:
    env = cli_env(fake, KOMMO_TOKEN="wrong-token")

    get = await kommo_talks("get", "1", env=env)
    close = await kommo_talks("close", "1", "2", "--force", env=env)

    assert get.code == 1
    assert_one_line_error(get, "401", "KOMMO_TOKEN")
    assert "wrong-token" not in get.err
    assert close.code == 1
    assert_one_line_error(close, "nothing else was sent", "401")
    assert fake.stats.by_route["close"] == 1  # the first close alone; then it stopped


# -- close -----------------------------------------------------------------------------------


async def test_a_first_close_refused_for_the_account_stops_before_the_rest(
    fake: FakeKommo,
) -> None:
    fake.script("close", 402)  # the account is unpaid: every close would get it

    result = await kommo_talks("close", "1", "2", "3", env=cli_env(fake))

    assert result.code == 1
    assert_one_line_error(result, "nothing else was sent", "402")
    assert fake.stats.by_route["close"] == 1
    assert fake.closed_talks() == []


async def test_a_missing_first_talk_does_not_stop_the_others(fake: FakeKommo) -> None:
    result = await kommo_talks("close", "404", "1", "2", "--force", env=cli_env(fake))

    assert result.code == 1  # one talk failed
    assert fake.closed_talks() == [1, 2]
    assert "404" in result.out


async def test_close_ids_given_as_arguments(fake: FakeKommo) -> None:
    result = await kommo_talks("close", "1", "2", "3", "2", "--force", env=cli_env(fake))

    assert result.code == 0, result.err
    assert fake.closed_talks() == [1, 2, 3]
    assert [r.route for r in fake.requests] == ["close"] * 3  # nothing else is sent
    assert "Summary" in result.out
    assert "closed" in result.out
    assert all(r.json() == {"force_close": True} for r in fake.requests if r.route == "close")


async def test_close_reads_ids_from_stdin(fake: FakeKommo) -> None:
    stdin = b"4\n\n# a comment\n  5  \n4\n6\n"
    result = await kommo_talks("close", "--from", "-", "--force", env=cli_env(fake), stdin=stdin)

    assert result.code == 0, result.err
    assert fake.closed_talks() == [4, 5, 6]
    assert "closing: 3/3 (100%)" in result.err  # plain progress lines off a terminal


async def test_a_bad_line_on_stdin_is_named_and_nothing_is_closed(fake: FakeKommo) -> None:
    stdin = b"1\n2\n\n12x\n3\n"
    result = await kommo_talks("close", "--from", "-", "--force", env=cli_env(fake), stdin=stdin)

    assert result.code == 2
    assert_one_line_error(result, "stdin, line 4", "'12x'", "nothing was closed")
    assert fake.stats.requests == 0


async def test_a_bad_line_in_a_file_is_named_and_nothing_is_closed(
    fake: FakeKommo, tmp_path: Path
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n-5\n")
    result = await kommo_talks("close", "--from", str(ids), env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, f"{ids}, line 3", "'-5'")
    assert fake.stats.requests == 0


async def test_a_bad_argument_is_named_and_nothing_is_closed(fake: FakeKommo) -> None:
    result = await kommo_talks("close", "1", "two", env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, "argument 2", "'two'")
    assert fake.stats.requests == 0


async def test_close_without_ids_is_a_usage_error(fake: FakeKommo) -> None:
    result = await kommo_talks("close", env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, "no talk IDs")


async def test_close_of_an_input_without_ids_has_nothing_to_do(fake: FakeKommo) -> None:
    # `list --filter ... | close --from -` when nothing matched: not an error.
    result = await kommo_talks("close", "--from", "-", env=cli_env(fake), stdin=b"# nothing\n")

    assert result.code == 0
    assert "nothing to close" in result.err
    assert fake.stats.requests == 0


async def test_close_reads_a_file_that_starts_with_a_bom(fake: FakeKommo, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_bytes("\ufeff5\r\n6\r\n".encode())  # as Excel or Notepad save it

    result = await kommo_talks("close", "--from", str(ids), "--force", env=cli_env(fake))

    assert result.code == 0, result.err
    assert fake.closed_talks() == [5, 6]


async def test_close_json_reports_every_talk_and_exits_1_on_a_failure(fake: FakeKommo) -> None:
    fake.talks[2]["is_in_work"] = False

    result = await kommo_talks("close", "1", "2", "999", "--force", "--json", env=cli_env(fake))

    assert result.code == 1
    records = [orjson.loads(line) for line in result.out.splitlines()]
    assert [r["talk_id"] for r in records] == [1, 2, 999]
    assert records[0] == {"talk_id": 1, "status": "closed"}
    assert records[1] == {"talk_id": 2, "status": "already_closed"}
    assert records[2]["status"] == "failed"
    assert records[2]["http_status"] == 404
    assert records[2]["error_type"] == "NotFoundError"
    assert "Summary" in result.err  # the human summary goes to stderr with --json


async def test_already_closed_talks_still_exit_0(fake: FakeKommo) -> None:
    fake.talks[1]["is_in_work"] = False

    result = await kommo_talks("close", "1", "2", "--force", env=cli_env(fake))

    assert result.code == 0, result.err
    assert "already closed" in result.out


async def test_a_block_stops_the_close_and_lists_talks_not_attempted(fake: FakeKommo) -> None:
    fake.script("close", Fault(), Fault.error(403, html=True))  # the first goes through

    result = await kommo_talks(
        "close", "1", "2", "3", "4", "--force", "--concurrency", "1", "--json", env=cli_env(fake)
    )

    assert result.code == 1
    records = [orjson.loads(line) for line in result.out.splitlines()]
    assert records[0]["status"] == "closed"
    assert records[1]["status"] == "failed"
    assert records[1]["http_status"] == 403
    assert [r["status"] for r in records[2:]] == ["not_attempted"] * 2
    assert "IP/account block" in records[2]["reason"]
    assert "Not attempted" in result.err
    assert fake.stats.by_route["close"] == 2


async def test_a_block_on_the_first_close_is_one_line_and_nothing_else_is_sent(
    fake: FakeKommo,
) -> None:
    fake.script("close", Fault.error(403, html=True))

    result = await kommo_talks("close", "1", "2", "3", "--force", env=cli_env(fake))

    assert result.code == 1
    assert_one_line_error(result, "nothing else was sent", "blocks this IP")
    assert fake.stats.by_route["close"] == 1


# -- list --------------------------------------------------------------------------------------


async def test_list_prints_one_id_per_line(fake: FakeKommo) -> None:
    result = await kommo_talks("list", env=cli_env(fake))

    assert result.code == 0, result.err
    assert result.out.splitlines() == [str(i) for i in range(1, 101)]


async def test_list_json_prints_one_talk_per_line(fake: FakeKommo) -> None:
    result = await kommo_talks("list", "--json", env=cli_env(fake))

    assert result.code == 0, result.err
    talks = [orjson.loads(line) for line in result.out.splitlines()]
    assert [t["talk_id"] for t in talks] == list(range(1, 101))


async def test_list_sends_filters(fake: FakeKommo) -> None:
    result = await kommo_talks(
        "list", "--filter", "is_read=1", "--filter", "origin=telegram", env=cli_env(fake)
    )

    assert result.code == 0, result.err
    first = next(r for r in fake.requests if r.route == "list")
    assert first.query["filter[is_read]"] == ["1"]
    assert first.query["filter[origin]"] == ["telegram"]


@pytest.mark.parametrize(
    ("value", "sent"), [("0", None), ("false", None), ("1", ["1"]), ("", [""])]
)
async def test_list_only_in_work_0_sends_no_key_as_the_flag_works_by_presence(
    fake: FakeKommo, value: str, sent: list[str] | None
) -> None:
    fake.talks[3]["is_in_work"] = False
    result = await kommo_talks("list", "--filter", f"only_in_work={value}", env=cli_env(fake))

    assert result.code == 0, result.err
    first = next(r for r in fake.requests if r.route == "list")
    assert first.query.get("filter[only_in_work]") == sent
    assert ("3" in result.out.splitlines()) is (sent is None)


async def test_list_refuses_a_filter_without_a_value(fake: FakeKommo) -> None:
    result = await kommo_talks("list", "--filter", "is_read", env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, "KEY=VALUE")


async def test_list_piped_into_close_closes_every_talk() -> None:
    command = (
        f"{sys.executable} -m kommo_talks.cli list | "
        f"{sys.executable} -m kommo_talks.cli close --from - --force --json"
    )
    # 50 ms of slack in the window for scheduling on a loaded machine (the client keeps 1 s).
    async with FakeKommo(talks=range(1, 13), rate_limit=7, rate_window=0.95) as fake:
        process = await asyncio.create_subprocess_shell(
            command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(fake),
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()

    assert process.returncode == 0, err.decode()
    assert fake.closed_talks() == list(range(1, 13))
    assert len(out.decode().splitlines()) == 12
    assert fake.stats.throttled == 0  # the two processes kept the account's limit together
    # `close` read its whole input before sending: every list request came first.
    routes = [r.route for r in fake.requests]
    assert routes.index("close") > max(i for i, r in enumerate(routes) if r == "list")


# -- auth and --token-file ------------------------------------------------------------------------


async def test_auth_writes_a_token_file_that_the_other_commands_use(
    fake: FakeKommo, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    env = cli_env(
        fake,
        KOMMO_TOKEN=None,
        KOMMO_CLIENT_ID=fake.oauth.client_id,
        KOMMO_CLIENT_SECRET=fake.oauth.client_secret,
        KOMMO_REDIRECT_URI=fake.oauth.redirect_uri,
    )
    code = fake.oauth.issue_code()

    auth = await kommo_talks("auth", code, "--token-file", str(tokens), env=env)
    get = await kommo_talks("get", "3", "--json", "--token-file", str(tokens), env=env)

    assert auth.code == 0, auth.err
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    for secret in fake.oauth.secret_values():
        assert secret not in auth.out
        assert secret not in auth.err
    assert get.code == 0, get.err
    assert orjson.loads(get.out)["talk_id"] == 3


async def test_auth_with_a_bad_code_is_one_line_and_exit_1(fake: FakeKommo, tmp_path: Path) -> None:
    env = cli_env(
        fake,
        KOMMO_CLIENT_ID=fake.oauth.client_id,
        KOMMO_CLIENT_SECRET=fake.oauth.client_secret,
        KOMMO_REDIRECT_URI=fake.oauth.redirect_uri,
    )
    result = await kommo_talks("auth", "not-a-code", "--token-file", str(tmp_path / "t"), env=env)

    assert result.code == 1
    assert_one_line_error(result, "authorization failed")
    assert not (tmp_path / "t").exists()


async def test_auth_without_client_settings_is_a_usage_error(
    fake: FakeKommo, tmp_path: Path
) -> None:
    result = await kommo_talks(
        "auth", "code", "--token-file", str(tmp_path / "t"), env=cli_env(fake)
    )

    assert result.code == 2
    assert_one_line_error(result, "KOMMO_CLIENT_ID is not set")


async def test_a_missing_token_file_is_a_usage_error(fake: FakeKommo, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    result = await kommo_talks("get", "1", "--token-file", str(missing), env=cli_env(fake))

    assert result.code == 2
    assert_one_line_error(result, "no such file", "kommo-talks auth")


async def test_a_corrupt_token_file_is_a_usage_error_naming_the_fix(
    fake: FakeKommo, tmp_path: Path
) -> None:
    corrupt = tmp_path / "tokens.json"
    corrupt.write_text("{garbage")
    env = cli_env(
        fake,
        KOMMO_TOKEN=None,
        KOMMO_CLIENT_ID=fake.oauth.client_id,
        KOMMO_CLIENT_SECRET=fake.oauth.client_secret,
        KOMMO_REDIRECT_URI=fake.oauth.redirect_uri,
    )

    result = await kommo_talks("get", "1", "--token-file", str(corrupt), env=env)

    assert result.code == 2
    assert_one_line_error(result, "corrupt", "kommo-talks auth CODE --token-file")
    assert corrupt.read_text() == "{garbage"  # never overwritten
    assert fake.stats.requests == 0


# -- demo, help ---------------------------------------------------------------------------------


async def test_demo_runs_end_to_end_and_exits_0() -> None:
    result = await kommo_talks("demo", "--talks", "40", "--rate", "200", env=cli_env())

    assert result.code == 0, result.err
    assert "all 40 talks closed, 0 answers 429" in result.out
    assert "injected faults" in result.out
    assert "closing: 40/40 (100%)" in result.err


async def test_help_lists_every_command() -> None:
    result = await kommo_talks("--help", env=cli_env())

    assert result.code == 0
    for command in ("get", "close", "list", "demo", "auth"):
        assert command in result.out
    assert "130 interrupted" in " ".join(result.out.split())


async def test_list_help_says_what_it_prints() -> None:
    result = await kommo_talks("list", "--help", env=cli_env())

    text = " ".join(result.out.split())
    assert result.code == 0
    assert "one per line" in text
    assert "JSON object" in text
    assert "only_in_work=0" in text
