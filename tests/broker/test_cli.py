"""``lorastream serve | adapters``: flags, the adapter registry commands, embedded Redis."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from broker import producer
from broker.embedded import RedisServer, free_port
from broker.redis_conn import RedisSettings, connect
from engine.cli import build_parser, main
from tests.broker.conftest import PREFIX

ROOT = Path(__file__).resolve().parents[2]


def test_serve_takes_engine_and_service_flags() -> None:
    ns = build_parser().parse_args(
        ["serve", "--model", "m", "--enable-lora", "--max-loras", "4", "--redis-url", "redis://h:1/0",
         "--claim-idle-ms", "5000", "--max-deliveries", "3", "--drain-timeout", "7", "--result-ttl", "0",
         "--max-payload-bytes", "100", "--lora-root", "/a", "--metrics-port", "9100", "--consumer-name", "c"]
    )  # fmt: skip
    assert (ns.command, ns.enable_lora, ns.max_loras, ns.claim_idle_ms) == ("serve", True, 4, 5000)
    assert (ns.max_deliveries, ns.drain_timeout, ns.result_ttl, ns.lora_root) == (3, 7.0, 0, "/a")


def test_adapters_add_ls_rm(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sql").mkdir()
    base = ["adapters", "--redis-url", redis_server.url, "--prefix", PREFIX]
    assert main([*base, "add", "sql", "sql", "--lora-root", str(tmp_path)]) == 0
    assert main([*base, "add", "chat", "/abs/chat"]) == 0
    assert main([*base, "add", "evil", "../x", "--lora-root", str(tmp_path)]) == 2
    assert "must not contain '..'" in capsys.readouterr().err
    assert main([*base, "ls"]) == 0
    assert capsys.readouterr().out.splitlines() == ["chat\t/abs/chat", "sql\tsql"]
    assert main([*base, "rm", "chat"]) == 0
    assert main([*base, "rm", "chat"]) == 1
    r = redis.Redis.from_url(redis_server.url)
    assert r.hgetall(f"{PREFIX}:adapters") == {b"sql": b"sql"}
    r.close()


@pytest.mark.anyio
async def test_serve_without_a_url_starts_and_stops_a_private_redis() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.broker.fake_worker", "--prefix", PREFIX, "--consumer-name", "solo"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        match = re.search(rb"private redis-server at (redis://\S+)", line)
        assert match, line
        url = match.group(1).decode()
        client = connect(RedisSettings(url))
        try:
            await producer.submit(
                client, PREFIX, {"id": "e", "prompt": "a", "params": {"max_tokens": 3}}
            )
            events = [e async for e in producer.events(client, PREFIX, "e", timeout_s=20)]
            assert events[-1].finish_reason == "length"
        finally:
            await client.aclose()
        proc.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# ----------------------------------------------------------------------------- manners
COMMANDS = [
    "make-tiny-model",
    "serve",
    "status",
    "adapters",
    "generate",
    "gateway",
    "loadtest",
    "demo",
]
HEAVY = ("torch", "transformers", "starlette", "uvicorn", "matplotlib")


def _parsers(
    parser: argparse.ArgumentParser, name: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}".strip())


def test_every_flag_has_help_and_shows_its_default() -> None:
    missing, no_default = [], []
    for name, parser in _parsers(build_parser(), ""):
        if name.split(" ")[0] not in ["", *COMMANDS]:
            continue
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            if not action.help:
                missing.append(f"{name} {flag}")
            elif action.option_strings and not action.required:
                shown = formatter._get_help_string(action) or ""
                if "default" not in shown.lower():
                    no_default.append(f"{name} {flag}")
    assert missing == []
    assert no_default == []


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_loads_only_what_the_subcommand_uses(command: str) -> None:
    """``--help`` builds only its subcommand's flags: no model stack for a client command
    and no web stack for a worker; serve's engine flags come without torch. The gateway's
    flags take their defaults from GatewayConfig, beside the web app it configures."""
    code = (
        "import sys\nfrom engine.cli import main\n"
        f"try:\n    main({[command, '--help'] if command else ['--help']!r})\n"
        "except SystemExit:\n    pass\n"
        f"print('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.strip().splitlines()[-1].split()[1:])
    assert loaded <= ({"starlette"} if command == "gateway" else set())
    assert "usage: lorastream" in proc.stdout


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("LORASTREAM_REDIS_URL", "LORASTREAM_DEBUG")
    }
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env=env or _env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _one_line(rc: int | str | None, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str, str]:
    """``lorastream ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        rc: int | str | None = main(argv)
    except SystemExit as e:  # argparse's way out
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_user_errors_are_one_line_and_exit_2(
    redis_server: RedisServer,
    busy_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORASTREAM_REDIS_URL", raising=False)
    monkeypatch.delenv("LORASTREAM_DEBUG", raising=False)
    up = redis_server.url
    down = f"redis://127.0.0.1:{free_port()}/0"
    cases = [
        (["generate", "--max-tokens", "many", "hi"], "invalid int value: 'many'"),
        (["generate", "--redis-url", up, "--params", "{top_k: 5}", "hi"], "--params"),
        (["generate", "--redis-url", up, "--params", "[1]", "hi"], "JSON object"),
        (["generate", "--redis-url", up, "--system", "be brief", "hi"], "--system needs --chat"),
        (["generate", "--redis-url", "http://127.0.0.1:1/0", "hi"], "use redis://, rediss://, unix:// or redis+cluster://"),
        (["generate", "--redis-url", down, "hi"], "cannot reach Redis at redis://127.0.0.1"),
        (["status"], "pass --redis-url or set $LORASTREAM_REDIS_URL"),
        (["status", "--redis-url", down], "start redis-server there or fix --redis-url"),
        (["adapters", "--redis-url", down, "ls"], "cannot reach Redis"),
        (["gateway", "--redis-url", down], "cannot reach Redis"),
        (["gateway", "--redis-url", up, "--port", str(busy_port)], "choose another --port"),
        (["loadtest", "--redis-url", down, "--adapters", "base", "--out", str(tmp_path)],
         "cannot reach Redis"),
        (["loadtest", "--redis-url", up, "--input-len", "5,2"], "MIN,MAX"),
        (["loadtest", "--redis-url", up, "--workload", "trace", "--trace", str(tmp_path / "no.jsonl"),
          "--out", str(tmp_path)], "no.jsonl"),
        (["serve", "--model", "m", "--redis-url", down, "--redis-wait", "0"], "cannot reach Redis"),
        (["serve", "--model", "m", "--redis-url", up, "--metrics-port", str(busy_port)],
         "choose another --metrics-port"),
        (["serve", "--model", str(tmp_path / "none"), "--device", "cpu", "--redis-url", up], "model"),
        (["serve", "--model", "m", "--enable-lora", "--max-lora-rank", "7", "--redis-url", up],
         "max_lora_rank"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, _, err = _main(argv, capsys)
        line = _one_line(rc, err)
        assert expected in line, (argv, line)
        assert line.startswith("lorastream"), line
    # And as a user runs it, in its own process.
    proc = _run("generate", "--redis-url", down, "hi")
    assert "cannot reach Redis" in _one_line(proc.returncode, proc.stderr)


def test_debug_shows_the_traceback() -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    for argv, env in (
        (["--debug", "status", "--redis-url", down], _env()),
        (["status", "--redis-url", down], {**_env(), "LORASTREAM_DEBUG": "1"}),
    ):
        proc = _run(*argv, env=env)
        assert proc.returncode == 1
        assert "Traceback" in proc.stderr
        assert "ConnectionError" in proc.stderr


def test_serve_start_up_failure_stops_the_private_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORASTREAM_REDIS_URL", raising=False)
    rc, out, err = _main(["serve", "--model", str(tmp_path / "none"), "--device", "cpu"], capsys)
    assert "model" in _one_line(rc, err)
    match = re.search(r"private redis-server at (redis://\S+)", out)
    assert match, out
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(match.group(1), socket_connect_timeout=0.5).ping()


def test_a_second_sigint_stops_serve_at_once(redis_server: RedisServer, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.broker.fake_worker", "--redis-url", redis_server.url,
             "--prefix", PREFIX, "--consumer-name", "w1", "--block-ms", "100", "--step-delay", "0.05"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    r = redis.Redis.from_url(redis_server.url)
    try:
        r.xadd(
            f"{PREFIX}:requests",
            {"json": '{"v":1,"id":"long","prompt":"a","params":{"max_tokens":100000}}'},
        )
        _until(lambda: r.xlen(f"{PREFIX}:out:long") > 0, log)
        proc.send_signal(signal.SIGINT)
        _until(lambda: "draining" in log.read_text(), log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 128 + signal.SIGINT
    finally:
        r.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "stopping now" in text
    assert "Traceback" not in text


def _until(predicate: Callable[[], bool], log: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


# ----------------------------------------------------------------------------- status
def test_status_shows_workers_queue_dead_letters_and_registry(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """One worker (one slot) holds a long request while two more wait; one dead letter; two
    registered adapters: the JSON and the tables say so, as Redis itself counts them."""
    r = redis.Redis.from_url(redis_server.url)
    stream, group = f"{PREFIX}:requests", f"{PREFIX}:workers"
    base = ["status", "--redis-url", redis_server.url, "--prefix", PREFIX]
    empty = json.loads(_run(*base, "--json").stdout)
    assert empty["workers"] == []
    assert empty["queue"] == {"stream": stream, "group": group, "length": 0,
                              "group_exists": False, "lag": 0, "pending": 0, "consumers": 0}  # fmt: skip

    # Names are anyone's text: "[red]..." must show as written, not as rich markup.
    r.hset(f"{PREFIX}:adapters", mapping={"sql": "sql-v2", "[red]chat": "chat"})
    r.xadd(f"{PREFIX}:requests:dlq", {"reason": "bad_payload", "message": "x"})
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.broker.fake_worker", "--redis-url", redis_server.url,
             "--prefix", PREFIX, "--consumer-name", "gpu-7", "--block-ms", "100",
             "--step-delay", "0.05", "--max-num-seqs", "1", "--heartbeat-interval", "0.2",
             "--lora-modules", "base-fix=/a/base-fix"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        for i in range(3):
            r.xadd(stream, {"json": json.dumps({"v": 1, "id": f"r{i}", "prompt": "a", "params": {"max_tokens": 100000}})})  # fmt: skip

        def settled() -> bool:
            groups = r.xinfo_groups(stream)
            workers = r.zcard(f"{PREFIX}:workers:live")
            return bool(groups) and (groups[0]["pending"], groups[0]["lag"], workers) == (1, 2, 1)

        _until(settled, log)
        proc_json = _run(*base, "--json")
        assert proc_json.returncode == 0, proc_json.stderr
        status = json.loads(proc_json.stdout)
        [w] = status["workers"]
        assert (w["consumer"], w["model"], w["pid"]) == ("gpu-7", "fake", proc.pid)
        assert w["adapters_served"] == ["base-fix"]
        assert (w["max_num_seqs"], w["free_slots"], w["inflight"]) == (1, 0, 1)
        assert status["queue"] == {"stream": stream, "group": group, "length": 3,
                                   "group_exists": True, "lag": 2, "pending": 1, "consumers": 1}  # fmt: skip
        assert status["dead_letters"] == {"stream": f"{stream}:dlq", "length": 1}
        assert status["adapters"] == {"[red]chat": "chat", "sql": "sql-v2"}

        table = _run(*base, env={**_env(), "COLUMNS": "200"})
        assert table.returncode == 0, table.stderr
        text = table.stdout
        row = next(line for line in text.splitlines() if "gpu-7" in line)
        for cell in ("fake", "base-fix", "0 / 1", "s ago"):
            assert cell in row, row
        assert f"queue {stream}: 3 entries, lag 2, pending 1" in text
        assert f"dead letters {stream}:dlq: 1" in text
        assert re.search(r"sql\s.*sql-v2", text)
        assert "[red]chat" in text
    finally:
        r.close()
        proc.kill()
        proc.wait()
