"""The ``lorastream`` console command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler]] = {}


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
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--seed", type=int, default=0)


@command("make-tiny-model", _setup_tiny)
def _make_tiny(ns: argparse.Namespace) -> int:
    """Write a small random checkpoint, a real tokenizer and N PEFT adapters."""
    from engine.model.tiny import make_tiny_model

    out = make_tiny_model(ns.out, num_adapters=ns.adapters, arch=ns.arch, seed=ns.seed)
    print(out)
    return 0


def _broker_setup(name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A flag setup from broker/cli.py, imported when the parser is built."""

    def setup(p: argparse.ArgumentParser) -> None:
        import broker.cli

        getattr(broker.cli, name)(p)

    return setup


def _broker_run(name: str, ns: argparse.Namespace) -> int:
    import broker.cli

    return int(getattr(broker.cli, name)(ns))


@command("serve", _broker_setup("add_serve_args"))
def _serve(ns: argparse.Namespace) -> int:
    """Serve requests from Redis streams (docs/protocol.md)."""
    return _broker_run("run_serve", ns)


@command("adapters", _broker_setup("add_adapters_args"))
def _adapters(ns: argparse.Namespace) -> int:
    """Add, remove or list adapters in the Redis registry."""
    return _broker_run("run_adapters", ns)


@command("demo", _broker_setup("add_demo_args"))
def _demo(ns: argparse.Namespace) -> int:
    """Tiny model, private Redis, one worker: several adapters streaming side by side."""
    return _broker_run("run_demo", ns)


def _clients_setup(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def setup(p: argparse.ArgumentParser) -> None:
        import clients.cli

        getattr(clients.cli, name)(p)

    return setup


def _clients_run(name: str, ns: argparse.Namespace) -> int:
    import clients.cli

    return int(getattr(clients.cli, name)(ns))


@command("generate", _clients_setup("add_generate_args"))
def _generate(ns: argparse.Namespace) -> int:
    """Send one prompt to the workers and stream the tokens to the terminal."""
    return _clients_run("run_generate", ns)


@command("gateway", _clients_setup("add_gateway_args"))
def _gateway(ns: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP gateway (and chat page) in front of the workers."""
    return _clients_run("run_gateway", ns)


@command("loadtest", _clients_setup("add_loadtest_args"))
def _loadtest(ns: argparse.Namespace) -> int:
    """Open-loop load generator through Redis: S-LoRA/Punica workloads or a trace."""
    return _clients_run("run_loadtest", ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorastream", description="Multi-LoRA LLM serving over Redis"
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, fn) in _COMMANDS.items():
        p = sub.add_parser(
            name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None
        )
        setup(p)
        p.set_defaults(handler=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(ns.handler(ns))


if __name__ == "__main__":
    sys.exit(main())
