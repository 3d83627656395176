"""The web chat at / in a real headless browser (Debian's chromium + chromedriver through selenium) against the real
`telechat-ms serve`: two streamed turns, text appearing piece by piece, the second request carrying the first turn
(what the server rendered is checked through its prompt token count), stop aborting the stream and freeing the
server's row, clear, copy, the system prompt, and model output containing `<script>` shown as text.

The served checkpoint is tiny and scripted (tests/web_fixtures.py): its greedy answer is known in advance and starts
with `<script>alert(1)</SCRIPT>`, written by the model itself. The browser is required, never skipped: CI installs
it (apt-get install -y chromium chromium-driver; pip install selenium==4.51.0).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from telechat_ms.chat_template import apply_chat_template
from telechat_ms.data.tokenizer import TeleChatTokenizer
from tests.web_fixtures import expected_answer, write_scripted_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"]
NAME = "telechat2-web-test"
STATIC = Path(__file__).resolve().parents[1] / "telechat_ms" / "serve" / "static"
TURN_TOKENS, LONG_TOKENS = 30, 800
# Records what the page sends and how the last answer's text grows (installed after every page load).
PROBES = """
window.__requests = [];
const realFetch = window.fetch;
window.fetch = function (url, init) {
  if (String(url).endsWith('/v1/chat/completions')) window.__requests.push(JSON.parse(init.body));
  return realFetch.apply(this, arguments);
};
window.__lengths = [];
new MutationObserver(() => {
  const boxes = document.querySelectorAll('#messages .message.assistant .content');
  if (boxes.length) window.__lengths.push([boxes.length, boxes[boxes.length - 1].textContent.length]);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict:
    return write_scripted_checkpoint(str(tmp_path_factory.mktemp("web_model")), seq_length=1024)


@pytest.fixture(scope="module")
def tokenizer(scripted) -> TeleChatTokenizer:
    return TeleChatTokenizer(scripted["tokenizer"])


@pytest.fixture(scope="module")
def server(scripted, tmp_path_factory):
    """`telechat-ms serve` in its own process on a free port; yields its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("web_server") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "telechat_ms.cli", "serve", scripted["model_dir"], "--port",
                                 str(port), "--served-model-name", NAME, "--max-batch-size", "2"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(log_path.parent))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            _get(url + "/health")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("telechat-ms serve did not come up:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: the web test needs Debian's browser "
                    "(apt-get install -y chromium chromium-driver); it is never skipped")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium missing: pip install selenium==4.51.0 (the web test is never skipped)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="telechat-web-chromium-")
    for flag in BROWSER_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The chat page as a user drives it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        self.d, self.url, self.By, self.Wait = driver, url, By, WebDriverWait
        driver.get(url + "/")
        self.wait(lambda d: d.find_element(By.ID, "model-name").text == NAME, "the model name from /v1/models")
        driver.execute_script(PROBES)

    def wait(self, condition, what: str, timeout: float = 60):
        return self.Wait(self.d, timeout, poll_frequency=0.05).until(condition, message=f"waiting for {what}")

    def el(self, element_id: str):
        return self.d.find_element(self.By.ID, element_id)

    def set(self, element_id: str, value: str) -> None:
        self.d.execute_script("arguments[0].value = arguments[1]", self.el(element_id), value)

    def send(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys
        box = self.el("prompt")
        box.clear()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def answers(self) -> list:
        return self.d.find_elements(self.By.CSS_SELECTOR, "#messages .message.assistant")

    def answer_done(self, index: int, states=("done",), timeout: float = 120):
        self.wait(lambda d: len(self.answers()) > index and self.answers()[index].get_attribute("data-state")
                  in states, f"answer {index} to reach {states}", timeout)
        return self.answers()[index]

    def text(self, index: int) -> str:
        return self.answers()[index].find_element(self.By.CSS_SELECTOR, ".content").text

    def requests(self) -> list[dict]:
        return self.d.execute_script("return window.__requests")

    def lengths(self, index: int) -> list[int]:
        return [n for count, n in self.d.execute_script("return window.__lengths") if count == index + 1]


def _prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.encode(apply_chat_template(messages, add_generation_prompt=True)))


def test_two_streamed_turns_history_and_script_shown_as_text(server, browser, tokenizer, scripted, tmp_path):
    page = Page(browser, server)
    page.set("temperature", "0")
    page.set("max-tokens", str(TURN_TOKENS))
    first_question = 'Hi <img src=x onerror="window.pwned=1"> there'
    page.send(first_question)
    first = page.answer_done(0)
    answer = expected_answer(tokenizer, scripted, TURN_TOKENS)
    assert answer.startswith("<script>alert(1)</SCRIPT> the the")
    # the model's markup and the user's are text on the page: same characters, no element made from them
    assert page.text(0) == answer
    user_box = browser.find_elements(page.By.CSS_SELECTOR, "#messages .message.user .content")[0]
    assert user_box.text == first_question
    assert browser.execute_script("return document.querySelectorAll('#messages script, #messages img').length") == 0
    assert browser.execute_script("return window.pwned === undefined")
    assert first.get_attribute("data-finish") == "length"
    # incremental: the answer's text grew through many intermediate lengths before its final one
    grown = page.lengths(0)
    assert len(set(grown)) >= 10 and grown == sorted(grown) and grown[-1] == len(answer)
    assert int(first.get_attribute("data-pieces")) >= 10
    assert int(first.get_attribute("data-completion-tokens")) == TURN_TOKENS

    second_question = "And the second question?"
    page.send(second_question)
    second = page.answer_done(1)
    assert page.text(1) == answer  # a bigram model answers the same whatever came before
    history = [{"role": "user", "content": first_question}, {"role": "assistant", "content": answer},
               {"role": "user", "content": second_question}]
    sent = page.requests()
    assert [r["messages"] for r in sent] == [history[:1], history]  # no system prompt set: the default one
    assert sent[1]["stream"] is True and sent[1]["temperature"] == 0 and sent[1]["max_tokens"] == TURN_TOKENS
    assert sent[1]["model"] == NAME
    assert not {"top_p", "top_k", "repetition_penalty"} & set(sent[1])  # empty fields: the model's defaults
    # what the server received and rendered: its prompt token count is that of the whole conversation
    assert int(first.get_attribute("data-prompt-tokens")) == _prompt_tokens(tokenizer, history[:1])
    assert int(second.get_attribute("data-prompt-tokens")) == _prompt_tokens(tokenizer, history)
    assert _prompt_tokens(tokenizer, history) > _prompt_tokens(tokenizer, history[:1]) + 2 * TURN_TOKENS // 3

    shot = tmp_path / "web_chat.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("TELECHAT_WEB_SCREENSHOT"):  # refresh docs/web_chat.png for the README
        shutil.copy(shot, os.environ["TELECHAT_WEB_SCREENSHOT"])
    # the Markdown switch re-renders the same text (the page shows text either way)
    page.el("render-markdown").click()
    assert page.text(0) == answer and page.text(1) == answer


def _metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(_get(url + "/metrics")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_stop_aborts_the_stream_and_frees_the_server_row(server, browser, tokenizer, scripted):
    page = Page(browser, server)
    page.set("temperature", "0")
    page.set("max-tokens", str(LONG_TOKENS))
    aborted_before = _metric(server, "telechat_requests_finished_total", finished_reason="abort")
    page.send("Tell me a long story")
    page.wait(lambda d: int(page.answers()[0].get_attribute("data-pieces") or 0) >= 5, "the first pieces")
    assert not page.el("stop").get_property("disabled") and page.el("send").get_property("disabled")
    page.el("stop").click()
    stopped = page.answer_done(0, states=("stopped",), timeout=10)
    text = page.text(0)
    time.sleep(1.0)
    assert page.text(0) == text  # nothing arrives after the stop
    pieces = int(stopped.get_attribute("data-pieces"))
    assert 5 <= pieces < LONG_TOKENS // 2 and stopped.get_attribute("data-completion-tokens") is None
    assert text == expected_answer(tokenizer, scripted, pieces)  # the part that did arrive, intact
    assert page.el("stop").get_property("disabled") and not page.el("send").get_property("disabled")
    # the server saw the disconnect: the request was cancelled and its row is free again
    deadline = time.time() + 10
    while _metric(server, "telechat_requests_finished_total", finished_reason="abort") <= aborted_before:
        assert time.time() < deadline, "the server never cancelled the aborted request"
        time.sleep(0.1)
    assert _metric(server, "telechat_num_requests_running") == 0
    # the conversation goes on, with the stopped answer in the history as far as it got
    page.set("max-tokens", "5")
    page.send("Shorter, please")
    page.answer_done(1)
    assert page.requests()[-1]["messages"] == [
        {"role": "user", "content": "Tell me a long story"}, {"role": "assistant", "content": text},
        {"role": "user", "content": "Shorter, please"}]
    assert page.text(1) == expected_answer(tokenizer, scripted, 5)


def test_system_prompt_clear_and_copy(server, browser, tokenizer, scripted):
    page = Page(browser, server)
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": server, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    page.set("temperature", "0")
    page.set("max-tokens", "8")
    for field, value in (("top-p", "0.9"), ("top-k", "0"), ("repetition-penalty", "1.1")):
        page.set(field, value)
    page.set("system-prompt", "You are a test.")
    page.send("one")
    first = page.answer_done(0)
    sent = page.requests()[0]
    assert (sent["top_p"], sent["top_k"], sent["repetition_penalty"], sent["max_tokens"]) == (0.9, -1, 1.1, 8)
    page.send("two")
    page.answer_done(1)
    assert page.requests()[1]["messages"][0] == {"role": "system", "content": "You are a test."}
    history = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "one"},
               {"role": "assistant", "content": expected_answer(tokenizer, scripted, 8)},
               {"role": "user", "content": "two"}]
    assert page.requests()[1]["messages"] == history
    assert int(page.answers()[1].get_attribute("data-prompt-tokens")) == _prompt_tokens(tokenizer, history)
    # copy puts the answer's own text on the clipboard
    first.find_element(page.By.CSS_SELECTOR, ".copy").click()
    page.wait(lambda d: first.get_attribute("data-copied") == "1", "the copy button")
    clip = browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('ERR ' + e))")
    assert clip == expected_answer(tokenizer, scripted, 8)
    # clear empties the page and the history: the next request carries only the new turn
    page.el("clear").click()
    assert page.answers() == [] and browser.find_elements(page.By.CSS_SELECTOR, "#messages .message") == []
    page.send("fresh start")
    page.answer_done(0)
    assert page.requests()[-1]["messages"] == [{"role": "system", "content": "You are a test."},
                                               {"role": "user", "content": "fresh start"}]


MARKDOWN_SAMPLE = """# Title <b>x</b>
Some **bold <i>y</i>** and *it* and `<script>alert(1)</script>` code.
A [safe link](https://example.com/a?b=1) and a [bad one](javascript:alert(2)).

```html
<script>alert(3)</script>
```
- item <img src=x onerror=alert(4)>
2. two
> quoted <u>z</u>
"""


def test_markdown_is_built_from_text_nodes(server, browser):
    """The page's renderer on hostile Markdown: structure from the Markdown, every tag in the text stays text."""
    Page(browser, server)
    result = browser.execute_script("""
        const box = document.createElement('div');
        box.appendChild(TeleMarkdown.render(arguments[0]));
        const tags = [...box.querySelectorAll('*')].map(n => n.tagName.toLowerCase());
        const link = box.querySelector('a');
        return {tags, text: box.textContent, href: link && link.href, rel: link && link.rel,
                links: box.querySelectorAll('a').length,
                code: [...box.querySelectorAll('code')].map(c => c.textContent)};
    """, MARKDOWN_SAMPLE)
    assert set(result["tags"]) <= {"h3", "p", "strong", "em", "code", "a", "pre", "ul", "ol", "li", "blockquote", "br"}
    assert {"h3", "strong", "em", "code", "a", "pre", "ul", "ol", "blockquote"} <= set(result["tags"])
    assert result["links"] == 1 and result["href"] == "https://example.com/a?b=1" and "noopener" in result["rel"]
    assert "[bad one](javascript:alert(2))" in result["text"]
    assert result["code"] == ["<script>alert(1)</script>", "<script>alert(3)</script>"]
    for literal in ("<b>x</b>", "<i>y</i>", "<img src=x onerror=alert(4)>", "<u>z</u>"):
        assert literal in result["text"], literal


def test_page_files_are_offline_and_never_inject_html():
    """The page loads nothing from elsewhere and no script builds markup from strings."""
    for name in ("index.html", "app.js", "markdown.js", "style.css"):
        source = (STATIC / name).read_text(encoding="utf-8")
        for pattern in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                        "http://", "https://", "//cdn", "@import"):
            if name == "markdown.js" and pattern in ("http://", "https://"):
                continue  # the link filter's own pattern
            assert pattern not in source, (name, pattern)
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert "script-src 'self'" in html and "<script>" not in html  # CSP, and no inline script for it to allow


def test_the_server_hands_out_the_page(server):
    assert "<title>TeleChat2 chat</title>" in _get(server + "/")
    for name in ("app.js", "markdown.js", "style.css"):
        assert _get(f"{server}/static/{name}") == (STATIC / name).read_text(encoding="utf-8")
    models = json.loads(_get(server + "/v1/models"))
    assert models["data"][0]["id"] == NAME


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns_and_goes_on(server, browser, tokenizer,
                                                                                   scripted):
    page = Page(browser, server)
    page.set("temperature", "0")
    page.set("max-tokens", "300")
    page.set("system-prompt", "You are a test.")
    answer = expected_answer(tokenizer, scripted, 300)
    system = {"role": "system", "content": "You are a test."}
    history = [system]
    for turn in range(4):            # 3 turns of ~310 tokens fit 1024 with room for 300 more; the 4th does not
        question = f"question number {turn}"
        page.send(question)
        done = page.answer_done(turn)
        assert page.text(turn) == answer and done.get_attribute("data-finish") == "length"
        history += [{"role": "user", "content": question}]
        sent = page.requests()[-1]["messages"]
        if turn < 3:
            assert sent == history and not browser.find_elements(page.By.CSS_SELECTOR, "#messages .notice")
        history += [{"role": "assistant", "content": answer}]
    # the 4th request: the first turn (question + answer) dropped, the system prompt kept, the rest whole
    assert sent == [system] + history[3:-1]
    assert _prompt_tokens(tokenizer, sent) + 300 <= 1024 < _prompt_tokens(tokenizer, history[:-1]) + 300
    notes = browser.find_elements(page.By.CSS_SELECTOR, "#messages .notice")
    assert len(notes) == 1 and notes[0].get_attribute("data-dropped") == "2"
    assert "dropped" in notes[0].text and "1024 tokens" in notes[0].text
    boxes = browser.find_elements(page.By.CSS_SELECTOR, "#messages .message")
    assert [b.get_attribute("data-dropped") for b in boxes] == ["1", "1"] + [None] * 6
    # a single message longer than the context: the server's own error message is shown, and the page goes on
    browser.execute_script("arguments[0].value = arguments[1]", page.el("prompt"), "word " * 1100)
    page.el("send").click()
    failed = page.answer_done(4, states=("error",))
    error = failed.find_element(page.By.CSS_SELECTOR, ".error").text
    assert "maximum context length is 1024 tokens" in error
    page.send("still there?")
    page.answer_done(5)
    assert page.requests()[-1]["messages"][-1] == {"role": "user", "content": "still there?"}
