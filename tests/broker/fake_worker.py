"""A worker process on the fake engine, for the kill and drain tests.

``python -m tests.broker.fake_worker --redis-url URL --consumer-name w1 [service flags]``
runs ``broker.cli.serve`` (signals, drain, exit code) exactly as ``lorastream serve`` does,
with ``FakeAsyncEngine`` instead of a model so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import anyio

from broker.cli import add_service_args, serve
from tests.broker.fake_engine import FakeAsyncEngine, FakeConfig


def main() -> int:
    parser = argparse.ArgumentParser(prog="fake_worker")
    add_service_args(parser)
    parser.add_argument("--model", default="fake", help="the model name its heartbeat reports")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--step-delay", type=float, default=0.01)
    parser.add_argument("--lora-modules", nargs="*", default=[])
    parser.add_argument("--crash-on-token", type=int, default=None)
    ns = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def factory(ns: argparse.Namespace, stat_loggers: list[Any]) -> FakeAsyncEngine:
        config = FakeConfig(max_num_seqs=ns.max_num_seqs, max_model_len=ns.max_model_len)
        return FakeAsyncEngine(
            config,
            step_delay_s=ns.step_delay,
            stat_loggers=stat_loggers,
            crash_on_token=ns.crash_on_token,
        )

    return anyio.run(serve, ns, factory, backend="asyncio")


if __name__ == "__main__":
    sys.exit(main())
