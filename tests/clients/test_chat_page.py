"""The chat page in headless Chromium (Debian's, driven by Playwright) against the real
gateway, a real redis-server and a fake-engine worker process: panes stream one question
from different models at once, multi-turn history and the system prompt reach the worker,
stop aborts the request, clear forgets, per-reply stats match the worker's usage, gateway
errors read plainly, and model output is text, never markup. A screenshot of a two-turn,
three-pane conversation is kept in artifacts/chat_page.png."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

from broker.embedded import RedisServer
from clients.gateway import ApiError, GatewayConfig, api_error
from clients.sdk import RequestExpired
from tests.clients.conftest import ROOT, FakeWorker, running_gateway, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "artifacts"
PREFIX = "chat"
BASE = "base-model"
ADAPTERS = ("lora-a", "lora-b")
# Conditions, not durations: every wait ends as soon as the page gets there.
expect.set_options(timeout=20_000)


@dataclass
class Site:
    """The gateway's URL and a view of Redis as the worker sees it."""

    url: str
    redis_url: str
    r: redis.Redis

    def mark(self) -> str:
        """The last request entry so far; ``requests_since`` reads what came after."""
        last: Any = self.r.xrevrange(f"{PREFIX}:requests", count=1)
        return last[0][0].decode() if last else "0-0"

    def requests_since(self, mark: str) -> list[dict[str, Any]]:
        """The wire requests the worker read after ``mark``, in order."""
        entries: Any = self.r.xrange(f"{PREFIX}:requests", min=f"({mark}")
        out = []
        for _, fields in entries:
            raw = fields.get(b"data")
            out.append(msgpack.unpackb(raw) if raw else json.loads(fields[b"json"]))
        return out

    def published(self, request_id: str) -> list[dict[str, Any]]:
        """The events the worker published for a request (its result stream)."""
        entries: Any = self.r.xrange(f"{PREFIX}:out:{request_id}")
        return sorted((msgpack.unpackb(f[b"data"]) for _, f in entries), key=lambda e: e["seq"])

    def final_event(self, request_id: str) -> dict[str, Any] | None:
        events = self.published(request_id)
        return events[-1] if events and events[-1]["finished"] else None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("chat")
    (tmp / "redis").mkdir()
    modules = []
    for name in ADAPTERS:
        (tmp / name).mkdir()  # the fake engine only checks that an adapter's directory exists
        modules.append(f"{name}={tmp / name}")
    with RedisServer(data_dir=tmp / "redis") as server:
        # Replies end only at max_tokens (the fake model has no end token); a long context
        # lets the stop test ask for a reply that cannot end during the test.
        worker = FakeWorker(
            server.url, PREFIX, tmp / "worker.log", "--consumer-name", "w1", "--model", BASE,
            "--step-delay", "0.02", "--max-model-len", "1000000", "--lora-modules", *modules,
        )  # fmt: skip
        cfg = GatewayConfig(
            redis_url=server.url,
            prefix=PREFIX,
            served_model_name=BASE,
            timeout_s=60,
            first_event_timeout_s=20,
        )
        r = redis.Redis.from_url(server.url)
        try:
            with running_gateway(cfg) as url:
                wait_for(lambda: _models(url) == [BASE, *ADAPTERS], "the worker's heartbeat")
                yield Site(url, server.url, r)
        finally:
            worker.kill()
            r.close()


def _models(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as res:
        return [m["id"] for m in json.load(res)["data"]]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    try:
        yield context.new_page()
    finally:
        context.close()


def open_chat(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "1")


def pane(page: Page, n: int) -> Locator:
    return page.get_by_role("region", name=f"Pane {n}", exact=True)


def replies(page: Page, n: int) -> Locator:
    return pane(page, n).locator(".msg.assistant")


def reply_text(page: Page, n: int, turn: int = 0) -> str:
    return replies(page, n).nth(turn).locator(".text").text_content() or ""


def choose(page: Page, models: list[str]) -> None:
    """One pane per model (panes added as needed), each set to its model."""
    for n, model in enumerate(models, start=1):
        if pane(page, n).count() == 0:
            page.get_by_role("button", name="Add pane").click()
        page.get_by_label(f"Model of pane {n}").select_option(model)


def ask(page: Page, text: str) -> None:
    """Sends `text` to every pane once every pane is idle, as a user can (Send is disabled
    while any pane streams, and Enter does nothing then)."""
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    box = page.get_by_label("Message to every pane")
    box.fill(text)
    box.press("Enter")


def by_adapter(requests: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    out = {r.get("adapter"): r for r in requests}
    assert len(out) == len(requests), requests  # one request per pane, one model per pane
    return out


# --------------------------------------------------------------------------- the tests
def test_panes_compare_models_side_by_side_over_two_turns(site: Site, page: Page) -> None:
    open_chat(page, site.url)
    models = [BASE, *ADAPTERS]
    choose(page, models)
    page.get_by_label("System prompt").fill("You answer in one short paragraph.")
    page.get_by_label("Max tokens").fill("24")
    mark = site.mark()
    ask(page, "What does a LoRA adapter change in a model?")
    for n in (1, 2, 3):
        expect(replies(page, n).first).to_have_attribute("data-status", "length")

    first = by_adapter(site.requests_since(mark))
    assert set(first) == {None, *ADAPTERS}
    system = {"role": "system", "content": "You answer in one short paragraph."}
    question = {"role": "user", "content": "What does a LoRA adapter change in a model?"}
    answers = {}
    for n, model in enumerate(models, start=1):
        wire = first[None if model == BASE else model]
        assert wire["messages"] == [system, question]
        assert wire["params"]["max_tokens"] == 24
        events = site.published(wire["id"])
        # What the pane shows is exactly what the worker generated, and its stats are the
        # worker's count; TTFT and speed are measured in the page.
        answers[model] = reply_text(page, n)
        assert answers[model] == "".join(e["text"] for e in events)
        stats = replies(page, n).first.locator(".stats")
        assert stats.get_attribute("data-tokens") == str(events[-1]["usage"]["completion_tokens"])
        assert events[-1]["usage"]["completion_tokens"] == 24
        assert float(stats.get_attribute("data-ttft-ms") or "nan") > 0
        assert float(stats.get_attribute("data-tokens-per-s") or "nan") > 0
        expect(stats).to_contain_text(re.compile(r"24 tokens · TTFT \d+ ms · [\d.]+ tok/s"))
    assert len(set(answers.values())) == 3  # three models, three different replies

    # Second turn, typed with Shift+Enter for a new line: every pane sends its own history.
    box = page.get_by_label("Message to every pane")
    box.press_sequentially("Shorter,")
    box.press("Shift+Enter")
    box.press_sequentially("please.")
    mark = site.mark()
    box.press("Enter")
    for n in (1, 2, 3):
        expect(replies(page, n).nth(1)).to_have_attribute("data-status", "length")
    second = by_adapter(site.requests_since(mark))
    for model in models:
        assert second[None if model == BASE else model]["messages"] == [
            system,
            question,
            {"role": "assistant", "content": answers[model]},
            {"role": "user", "content": "Shorter,\nplease."},
        ]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"chat page screenshot: {shot}")
    assert Path(shot).stat().st_size > 0


def test_stop_ends_one_stream_and_aborts_its_request(site: Site, page: Page) -> None:
    open_chat(page, site.url)
    choose(page, list(ADAPTERS))
    page.get_by_label("Max tokens").fill("100000")  # cannot finish during the test
    mark = site.mark()
    ask(page, "Count to a hundred thousand.")
    # Both panes stream at the same time: neither reply can end by itself.
    for n in (1, 2):
        expect(pane(page, n)).to_have_attribute("data-state", "streaming")
        expect(replies(page, n).first.locator(".text")).to_have_text(re.compile(r"\w"))
    wire = by_adapter(site.requests_since(mark))

    page.get_by_role("button", name="Stop pane 1").click()
    expect(replies(page, 1).first).to_have_attribute("data-status", "stopped")
    expect(pane(page, 1)).to_have_attribute("data-state", "idle")
    # The gateway saw the browser go and aborted the request at the worker.
    stopped = wire["lora-a"]["id"]
    wait_for(lambda: site.final_event(stopped) is not None, "pane 1's request to end")
    assert (site.final_event(stopped) or {})["finish_reason"] == "abort"

    # Pane 2 goes on: its reply still grows after pane 1 stopped.
    shown = len(reply_text(page, 2))
    page.wait_for_function(
        "n => document.querySelector('#pane-2 .msg.assistant .text').textContent.length > n",
        arg=shown,
    )
    assert site.final_event(wire["lora-b"]["id"]) is None
    page.keyboard.press("Escape")  # stops every pane
    expect(replies(page, 2).first).to_have_attribute("data-status", "stopped")
    wait_for(lambda: site.final_event(wire["lora-b"]["id"]) is not None, "pane 2's request to end")
    assert (site.final_event(wire["lora-b"]["id"]) or {})["finish_reason"] == "abort"
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    # A stopped reply stays in the conversation, as far as it got.
    partial = reply_text(page, 1)
    page.get_by_label("Max tokens").fill("2")
    mark = site.mark()
    ask(page, "Go on.")
    expect(replies(page, 1).nth(1)).to_have_attribute("data-status", "length")
    assert by_adapter(site.requests_since(mark))["lora-a"]["messages"] == [
        {"role": "user", "content": "Count to a hundred thousand."},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Go on."},
    ]


def test_clear_empties_a_pane_and_its_history(site: Site, page: Page) -> None:
    open_chat(page, site.url)
    choose(page, [BASE, "lora-a"])
    page.get_by_label("Max tokens").fill("4")
    ask(page, "First question")
    for n in (1, 2):
        expect(replies(page, n).first).to_have_attribute("data-status", "length")

    page.get_by_role("button", name="Clear pane 1").click()
    expect(pane(page, 1).locator(".turn")).to_have_count(0)
    expect(pane(page, 1)).to_contain_text("Nothing asked yet")
    expect(pane(page, 2).locator(".turn")).to_have_count(1)

    mark = site.mark()
    ask(page, "Second question")
    for n, count in ((1, 1), (2, 2)):
        expect(replies(page, n)).to_have_count(count)
        expect(replies(page, n).last).to_have_attribute("data-status", "length")
    wire = by_adapter(site.requests_since(mark))
    assert wire[None]["messages"] == [{"role": "user", "content": "Second question"}]
    assert [m["content"] for m in wire["lora-a"]["messages"]] == [
        "First question",
        reply_text(page, 2, 0),
        "Second question",
    ]


def test_gateway_errors_read_plainly_in_the_pane(site: Site, page: Page) -> None:
    # 400 from the gateway, naming the parameter; the failed turn leaves the history.
    open_chat(page, site.url)
    choose(page, [BASE])
    page.get_by_label("Temperature").fill("-1")
    ask(page, "Hello?")
    error = pane(page, 1).get_by_role("alert")
    expect(error).to_contain_text("HTTP 400 · invalid_sampling_params")
    expect(error).to_contain_text("temperature")
    expect(replies(page, 1).first).to_contain_text("left out of this pane's history")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("2")
    mark = site.mark()
    ask(page, "Hello again?")
    expect(replies(page, 1).nth(1)).to_have_attribute("data-status", "length")
    assert by_adapter(site.requests_since(mark))[None]["messages"] == [
        {"role": "user", "content": "Hello again?"}
    ]

    # 504 expired (the worker ended it at its deadline): the gateway's own error body.
    expired = api_error(RequestExpired("expired", "deadline passed 12 ms ago", request_id="r"))
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=expired.status, json=expired.body),
    )
    ask(page, "Late?")
    expect(replies(page, 1).nth(2).get_by_role("alert")).to_contain_text("HTTP 504 · expired")
    expect(replies(page, 1).nth(2).get_by_role("alert")).to_contain_text("deadline passed")

    # An error after the stream started: the partial reply stays visible above it.
    restarted = ApiError(
        500, "the request was restarted by another worker", code="stream_restarted"
    )
    page.unroute("**/v1/chat/completions")
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=sse(chunk("Half a rep"), restarted.body),
        ),
    )
    ask(page, "Interrupted?")
    answer = replies(page, 1).nth(3)
    expect(answer.get_by_role("alert")).to_contain_text("stream_restarted")
    expect(answer.locator(".text")).to_have_text("Half a rep")
    page.unroute("**/v1/chat/completions")

    # 503 from a gateway whose prefix no worker consumes.
    cfg = GatewayConfig(
        redis_url=site.redis_url, prefix="nobody", served_model_name=BASE, first_event_timeout_s=1
    )
    with running_gateway(cfg) as lonely:
        open_chat(page, lonely)
        expect(page.locator("#health")).to_have_text("no worker live")
        ask(page, "Anyone there?")
        error = pane(page, 1).get_by_role("alert")
        expect(error).to_contain_text("HTTP 503 · no_worker")
        expect(error).to_contain_text("Start a worker (lorastream serve)")


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": BASE,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_model_output_is_shown_as_text_never_as_markup(site: Site, page: Page) -> None:
    hostile = [
        "<script>window.pwned = 1</script>",
        '<img src=x onerror="window.pwned = 2">',
        "<b>bold?</b> &amp; done",
    ]
    model = '<img src=y onerror="window.pwned = 3">'

    def models(route: Route) -> None:
        route.fulfill(json={"object": "list", "data": [{"id": model, "object": "model"}]})

    def completions(route: Route) -> None:
        body = sse(*(chunk(t) for t in hostile), chunk("", "stop"))
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route("**/v1/models", models)
    page.route("**/v1/chat/completions", completions)
    open_chat(page, site.url)
    ask(page, "<i>not italic</i>")
    expect(replies(page, 1).first).to_have_attribute("data-status", "stop")
    assert reply_text(page, 1) == "".join(hostile)
    expect(pane(page, 1).locator(".msg.user .text")).to_have_text("<i>not italic</i>")
    expect(page.get_by_label("Model of pane 1").locator("option")).to_have_text([model])
    assert page.locator("#panes script, #panes img, #panes b, #panes i").count() == 0
    assert page.evaluate("window.pwned") is None
