"""``lorastream generate | gateway | loadtest`` (registered in engine/cli.py).

Flag setup imports only light modules: ``--help`` must not pay for starlette or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from engine.cli import UsageError

_URL_ENV = "LORASTREAM_REDIS_URL"


def _add_redis_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("redis")
    g.add_argument("--redis-url", default=os.environ.get(_URL_ENV),
                   help=f"the workers' Redis: redis://, rediss:// or unix:// (default ${_URL_ENV})")  # fmt: skip
    g.add_argument("--redis-ca-file", default=None,
                   help="CA bundle for rediss:// URLs (default: the system's)")  # fmt: skip
    g.add_argument("--prefix", default="lorastream", help="the workers' key prefix")


def _need_url(ns: argparse.Namespace) -> str:
    if not ns.redis_url:
        raise UsageError(f"no Redis given: pass --redis-url or set ${_URL_ENV}")
    return str(ns.redis_url)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e}): write a JSON object, e.g. '{{\"top_k\": 5}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"top_k\": 5}'")
    return value


# ----------------------------------------------------------------------------- generate
def add_generate_args(parser: argparse.ArgumentParser) -> None:
    from clients.sdk import NO_WORKER_AFTER_S

    _add_redis_args(parser)
    parser.add_argument("prompt", help="the prompt (with --chat: the user message)")
    parser.add_argument("--adapter", default=None,
                        help="adapter name (default: the base model)")  # fmt: skip
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the chat template")  # fmt: skip
    parser.add_argument("--system", default=None,
                        help="with --chat: a system message before the prompt (default: none)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature; 0 is greedy (default: the worker's, 1.0)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: the worker's)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the request may take; also its deadline on the wire")  # fmt: skip
    parser.add_argument("--no-worker-warning", type=float, default=NO_WORKER_AFTER_S,
                        help="seconds without an answer before checking that a worker "
                        "consumes the stream (a warning if none does)")  # fmt: skip
    parser.add_argument("--params", type=_json_object, default=None,
                        help="more sampling parameters as a JSON object, e.g. '{\"top_k\": 5}' "
                        "(default: none)")  # fmt: skip


def run_generate(ns: argparse.Namespace) -> int:
    from clients.sdk import Client, ClientError

    url = _need_url(ns)
    if ns.system is not None and not ns.chat:
        raise UsageError("--system needs --chat (a system message belongs to a conversation)")
    sampling: dict[str, Any] = {"max_tokens": ns.max_tokens}
    if ns.temperature is not None:
        sampling["temperature"] = ns.temperature
    if ns.seed is not None:
        sampling["seed"] = ns.seed
    sampling.update(ns.params or {})
    prompt: dict[str, Any] = {"prompt": ns.prompt}
    if ns.chat:
        system = [{"role": "system", "content": ns.system}] if ns.system is not None else []
        prompt = {"messages": [*system, {"role": "user", "content": ns.prompt}]}

    def warn(message: str) -> None:
        print(f"lorastream generate: {message}", file=sys.stderr, flush=True)

    last = None
    with Client(
        url,
        ns.prefix,
        timeout_s=ns.timeout,
        ca_file=ns.redis_ca_file,
        no_worker_after_s=ns.no_worker_warning,
        on_no_worker=warn,
    ) as c:
        try:
            for event in c.generate(adapter=ns.adapter, **prompt, **sampling):
                if event.restart:
                    sys.stdout.write("\n[restarted]\n")
                sys.stdout.write(event.text)
                sys.stdout.flush()
                last = event
        except KeyboardInterrupt:
            print("\n[aborted]", file=sys.stderr)
            return 130
        except ClientError as e:
            print(f"\nlorastream generate: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    if last is not None and last.usage:
        u = last.usage
        print(
            f"[{last.finish_reason}] {int(u.get('prompt_tokens', 0))} prompt + "
            f"{int(u.get('completion_tokens', 0))} completion tokens, "
            f"ttft {u.get('ttft_ms', 0):.0f} ms, total {u.get('e2e_ms', 0):.0f} ms",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------------- gateway
def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    from clients.gateway import GatewayConfig

    _add_redis_args(parser)
    d = GatewayConfig(redis_url="")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", default=d.served_model_name,
                        help="the model name meaning the base model (no adapter)")  # fmt: skip
    parser.add_argument("--adapter", action="append", default=[], dest="adapters",
                        help="an adapter name to list in /v1/models besides those live workers "
                        "serve and the registry holds (repeatable; default: none)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=d.timeout_s,
                        help="seconds a request may take (504 beyond); also its wire deadline")  # fmt: skip
    parser.add_argument("--first-token-timeout", type=float, default=d.first_event_timeout_s,
                        help="seconds to wait for a worker to start answering (503 beyond)")  # fmt: skip
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                        help="max_tokens of a chat request that sets none")  # fmt: skip


def run_gateway(ns: argparse.Namespace) -> int:
    from broker.redis_conn import RedisSettings, connect_sync
    from clients.gateway import GatewayConfig, serve

    url = _need_url(ns)
    if ns.default_max_tokens < 1:
        raise UsageError(f"--default-max-tokens {ns.default_max_tokens} is invalid: must be >= 1")
    # A wrong URL is found now rather than by the first request.
    client = connect_sync(RedisSettings(url, ca_file=ns.redis_ca_file))
    try:
        client.ping()
    finally:
        client.close()
    cfg = GatewayConfig(
        redis_url=url,
        prefix=ns.prefix,
        served_model_name=ns.served_model_name,
        adapters=tuple(ns.adapters),
        timeout_s=ns.timeout,
        first_event_timeout_s=ns.first_token_timeout,
        default_max_tokens=ns.default_max_tokens,
        ca_file=ns.redis_ca_file,
    )
    serve(cfg, ns.host, ns.port)
    return 0


# ----------------------------------------------------------------------------- loadtest
def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        a = b = 0
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"{text!r}: want MIN,MAX with 0 < MIN <= MAX")
    return a, b


def add_loadtest_args(parser: argparse.ArgumentParser) -> None:
    from clients.loadtest import PATTERNS, LoadtestConfig

    _add_redis_args(parser)
    d = LoadtestConfig(redis_url="")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=["slora", "punica", "trace"], default=d.workload,
                   help="slora: power-law popularity and Gamma gaps; punica: --pattern; "
                   "trace: --trace")  # fmt: skip
    w.add_argument("--pattern", choices=PATTERNS, default=d.pattern, help="punica's pattern")
    w.add_argument("--trace", default=None,
                   help="JSONL: {t, adapter, prompt|input_len, output_len} (default: none)")  # fmt: skip
    w.add_argument("--adapters", default=None,
                   help="comma-separated adapter names; 'base' is the base model "
                   "(default: the registry's adapters)")  # fmt: skip
    w.add_argument("--num-requests", type=int, default=d.num_requests, help="requests to send")
    w.add_argument("--alpha", type=float, default=d.alpha, help="popularity power-law exponent")
    w.add_argument("--rate", type=float, default=d.rate, help="requests per second")
    w.add_argument("--cv", type=float, default=d.cv, help="coefficient of variation of the gaps")
    w.add_argument("--input-len", type=_range, default=d.input_len, help="MIN,MAX words")
    w.add_argument("--output-len", type=_range, default=d.output_len, help="MIN,MAX tokens")
    w.add_argument("--seed", type=int, default=d.seed, help="seed of the workload")
    r = parser.add_argument_group("report")
    r.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_s * 1000,
                   help="SLO on time to first token")  # fmt: skip
    r.add_argument("--slo-itl-ms", type=float, default=d.slo_itl_s * 1000,
                   help="SLO on a request's mean inter-token latency")  # fmt: skip
    r.add_argument("--metrics-url", action="append", default=[], dest="metrics_urls",
                   help="a worker's Prometheus endpoint (repeatable), e.g. "
                   "http://host:9100/metrics (default: none)")  # fmt: skip
    r.add_argument("--out", default=d.out_dir, help="directory for results.json and the plots")
    r.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_loadtest(ns: argparse.Namespace) -> int:
    import anyio

    from clients.loadtest import LoadtestConfig, run_loadtest

    url = _need_url(ns)
    adapters: list[str | None] | None = None
    if ns.adapters:
        adapters = [None if a == "base" else a for a in ns.adapters.split(",") if a]
    cfg = LoadtestConfig(
        redis_url=url,
        prefix=ns.prefix,
        workload=ns.workload,
        pattern=ns.pattern,
        trace=ns.trace,
        adapters=adapters,
        num_requests=ns.num_requests,
        alpha=ns.alpha,
        rate=ns.rate,
        cv=ns.cv,
        input_len=ns.input_len,
        output_len=ns.output_len,
        seed=ns.seed,
        slo_ttft_s=ns.slo_ttft_ms / 1000,
        slo_itl_s=ns.slo_itl_ms / 1000,
        metrics_urls=ns.metrics_urls,
        out_dir=ns.out,
        timeout_s=ns.timeout,
        progress=not ns.no_progress,
    )
    result = anyio.run(run_loadtest, cfg, backend="asyncio")
    if result["summary"]["interrupted"]:
        return 130
    return 1 if result["summary"]["completed"] == 0 else 0
