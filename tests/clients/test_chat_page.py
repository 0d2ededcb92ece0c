"""The chat page in headless Chromium (Debian's, driven by Playwright): a prompt sent to two
adapters side by side, tokens appear in both panes, a screenshot saved as an artifact."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.clients.conftest import ROOT, Stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "artifacts"


def test_prompt_streams_tokens_into_two_panes(stack: Stack) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat_page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 600})
            page.goto(stack.gateway_url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            page.select_option("#model-a", "lora0")
            page.select_option("#model-b", "lora1")
            page.fill("#max-tokens", "24")
            page.fill("#prompt", "Tell me a story")
            page.click("#send")
            # Both panes finish ("length" or "stop" shows in their status).
            for k in ("a", "b"):
                page.wait_for_function(
                    f"['length', 'stop'].includes(document.getElementById('status-{k}').textContent)",
                    timeout=30_000,
                )
            answers = [page.inner_text(f"#out-{k} .answer") for k in ("a", "b")]
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"chat page screenshot: {shot}")
    assert all(answers), answers
    assert answers[0] != answers[1]  # two adapters, two different outputs
    assert Path(shot).stat().st_size > 0
