"""The ``lorastream`` console command.

Subcommands register here with their one-line help; their flags and handlers live in
broker/cli.py and clients/cli.py and are imported only for the subcommand being run, so that
``lorastream --help`` and ``lorastream generate --help`` load neither torch nor starlette nor
matplotlib. A user error (bad flag, bad path, Redis unreachable, busy port...) ends in one
line naming the problem and the fix and exit code 2; ``--debug`` or ``LORASTREAM_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

DEBUG_ENV = "LORASTREAM_DEBUG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler]] = {}


class UsageError(Exception):
    """A mistake the user can fix: printed as one line (the problem and the fix), exit 2."""


# Help that states its own default: "(default: ...)", "defaults to ...", "; default 8192 ...".
_STATES_DEFAULT = re.compile(r"\(default\b|\bdefaults? to\b|(^|[;.]\s*)default\b", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or _STATES_DEFAULT.search(text):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Flag errors in one line (with where to look), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def command(
    name: str, setup: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (setup, fn)
        return fn

    return register


def _setup_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--adapters", type=int, default=4, help="number of PEFT adapters to write")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="architecture")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


@command("make-tiny-model", _setup_tiny)
def _make_tiny(ns: argparse.Namespace) -> int:
    """Write a small random checkpoint, a real tokenizer and N PEFT adapters."""
    from engine.testing.tiny import make_tiny_model

    out = make_tiny_model(ns.out, num_adapters=ns.adapters, arch=ns.arch, seed=ns.seed)
    print(out)
    return 0


def _setup_from(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A flag setup from broker/cli.py or clients/cli.py, imported when the parser is built."""

    def setup(p: argparse.ArgumentParser) -> None:
        import importlib

        getattr(importlib.import_module(module), name)(p)

    return setup


def _run(module: str, name: str, ns: argparse.Namespace) -> int:
    import importlib

    return int(getattr(importlib.import_module(module), name)(ns))


@command("serve", _setup_from("broker.cli", "add_serve_args"))
def _serve(ns: argparse.Namespace) -> int:
    """Serve requests from Redis streams (docs/protocol.md)."""
    return _run("broker.cli", "run_serve", ns)


@command("status", _setup_from("broker.cli", "add_status_args"))
def _status(ns: argparse.Namespace) -> int:
    """Live workers, queue lag and pending entries, dead letters and registered adapters."""
    return _run("broker.cli", "run_status", ns)


@command("adapters", _setup_from("broker.cli", "add_adapters_args"))
def _adapters(ns: argparse.Namespace) -> int:
    """Add, remove or list adapters in the Redis registry."""
    return _run("broker.cli", "run_adapters", ns)


@command("demo", _setup_from("broker.cli", "add_demo_args"))
def _demo(ns: argparse.Namespace) -> int:
    """A real model (SmolLM2) and four adapters answering one question side by side."""
    return _run("broker.cli", "run_demo", ns)


@command("generate", _setup_from("clients.cli", "add_generate_args"))
def _generate(ns: argparse.Namespace) -> int:
    """Send one prompt to the workers and stream the tokens to the terminal."""
    return _run("clients.cli", "run_generate", ns)


@command("gateway", _setup_from("clients.cli", "add_gateway_args"))
def _gateway(ns: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP gateway (and chat page) in front of the workers."""
    return _run("clients.cli", "run_gateway", ns)


@command("loadtest", _setup_from("clients.cli", "add_loadtest_args"))
def _loadtest(ns: argparse.Namespace) -> int:
    """Open-loop load generator through Redis: S-LoRA/Punica workloads or a trace."""
    return _run("clients.cli", "run_loadtest", ns)


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is not a global option)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``argv``, only the subcommand it names gets its
    flags, so the other subcommands' modules are not imported."""
    chosen = _command_in(argv) if argv is not None else None
    parser = Parser(
        prog="lorastream",
        description="Multi-LoRA LLM serving over Redis",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging threshold")  # fmt: skip
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks of user errors too (or set {DEBUG_ENV}=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (setup, fn) in _COMMANDS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        if argv is None or name == chosen:
            setup(p)
        p.set_defaults(handler=fn)
    return parser


def user_error(err: BaseException, ns: argparse.Namespace | None = None) -> str | None:
    """One line naming the problem and the fix, or None for an error that is a bug."""
    from engine.errors import LoRAStreamError

    if isinstance(err, BaseExceptionGroup):
        # Task groups wrap what their tasks raised: a user error only if every one is.
        messages = [user_error(e, ns) for e in err.exceptions]
        return messages[0] if all(messages) else None
    redis_exc: Any = sys.modules.get("redis.exceptions")
    if isinstance(err, UsageError | ValueError):
        text = str(err)
    elif isinstance(err, LoRAStreamError):
        text = err.message
    elif redis_exc is not None and isinstance(err, redis_exc.AuthenticationError):
        text = f"Redis refused the credentials ({err}): fix the user and password in --redis-url"
    elif redis_exc is not None and isinstance(
        err, redis_exc.ConnectionError | redis_exc.TimeoutError
    ):
        text = (
            f"cannot reach Redis at {_redis_url(ns)} ({err}): start redis-server there or fix "
            "--redis-url (or $LORASTREAM_REDIS_URL)"
        )
    elif isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        text = f"{err.strerror}: choose another port"
    elif isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError):
        text = f"{err.strerror}: {err.filename}"
    else:
        return None
    return " ".join(text.split()) or type(err).__name__


def _redis_url(ns: argparse.Namespace | None) -> str:
    url = getattr(ns, "redis_url", None)
    if not url:
        return "the given URL"
    from broker.redis_conn import redact_url

    return redact_url(str(url))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser(args).parse_args(args)
    debug = ns.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    logging.basicConfig(
        level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(ns.handler(ns))
    except KeyboardInterrupt:
        print(f"lorastream {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e, ns)
        if message is None or debug:
            raise
        print(f"lorastream {ns.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # ``python -m engine.cli``: run the imported module, whose UsageError the subcommands raise
    # (this file as __main__ would define a second, different class).
    from engine.cli import main as _main

    sys.exit(_main())
