"""`telechat-ms serve` for real: uvicorn on a free port in a thread (one server for the module), the official
`openai` client and httpx, answers checked against the model's own generate / full forward."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from telechat_ms.chat_template import apply_chat_template  # noqa: E402
from telechat_ms.special_tokens import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from tests.serve_fixtures import (MAX_LEN, metric, random_ids, ref_model, serve_model_dir,  # noqa: E402,F401
                                  tokenizer)

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(serve_model_dir):
    from telechat_ms.serve.server import ServeConfig, ServerThread, build_state
    state = build_state(ServeConfig(serve_model_dir, served_model_name=MODEL, max_model_len=MAX_LEN,
                                    max_batch_size=8, max_queue=32))
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics").text


def _chat_ids(tokenizer, messages, tools=None) -> list[int]:
    return tokenizer.encode(apply_chat_template(messages, tools=tools, add_generation_prompt=True))


def _greedy(ref_model, tokenizer, ids, new, **kw):
    """(answer text, finish reason, completion tokens incl. a stop id) of model.generate greedy."""
    out = ref_model.generate([ids], max_new_tokens=new, **kw)
    return (tokenizer.decode(out.new_tokens[0], skip_special_tokens=True), out.finish_reasons[0],
            len(out.sequences[0]) - len(ids))


def _sse(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "你好，请介绍一下你自己。"}]


def test_chat_json_and_stream_agree_with_model_generate_and_count_usage(server, client, ref_model, tokenizer):
    ids = _chat_ids(tokenizer, MESSAGES)
    text, reason, count = _greedy(ref_model, tokenizer, ids, 24)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), count,
                                                                                         len(ids) + count)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == count
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 5, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse(resp.iter_lines())
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_greedy_completions_from_token_ids_equal_model_generate(client, ref_model, tokenizer):
    prompts = [random_ids(5, 11, tokenizer.vocab_size), random_ids(40, 12, tokenizer.vocab_size)]  # 40 > T = 32
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=30, temperature=0)
    expected = [_greedy(ref_model, tokenizer, p, 30) for p in prompts]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [e[0] for e in expected]
    assert [c.finish_reason for c in r.choices] == [e[1] for e in expected]
    assert r.usage.prompt_tokens == 45 and r.usage.completion_tokens == sum(e[2] for e in expected)


def test_eight_concurrent_requests_each_equal_their_answer_alone(server, client, tokenizer):
    vocab = tokenizer.vocab_size
    lengths, budgets = (3, 9, 17, 26, 35, 48, 60, 75), (40, 12, 30, 8, 25, 18, 35, 10)
    prompts = [random_ids(n, 100 + n, vocab) for n in lengths]

    def ask(i: int, delay: float = 0.0) -> tuple[str, int]:
        time.sleep(delay)
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=budgets[i], temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(i) for i in range(8)]
    before = _metrics(server)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ask(i, 0.03 * (i % 4)), range(8)))
    after = _metrics(server)
    assert together == alone
    multi = [metric(t, "telechat_batch_occupancy_rows_count") - metric(t, "telechat_batch_occupancy_rows_bucket",
                                                                      le="1.0") for t in (before, after)]
    assert multi[1] - multi[0] > 0                                  # steps that held more than one request
    assert metric(after, "telechat_batch_rows_max") >= 2
    assert metric(after, "telechat_mixed_steps_total") > metric(before, "telechat_mixed_steps_total")  # joined


def test_client_disconnect_frees_its_row_and_the_next_request_is_served(server, client, ref_model, tokenizer):
    before = _metrics(server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            seen = 0
            for line in resp.iter_lines():
                seen += '"content"' in line
                if seen >= 3:
                    break
    deadline = time.time() + 10
    while metric(text := _metrics(server), "telechat_num_requests_running") != 0 and time.time() < deadline:
        time.sleep(0.02)
    assert metric(text, "telechat_num_requests_running") == 0
    assert metric(text, "telechat_requests_finished_total", finished_reason="abort") == \
        metric(before, "telechat_requests_finished_total", finished_reason="abort") + 1
    freed = [metric(t, "telechat_abort_to_free_steps_bucket", le="1.0") for t in (before, text)]
    assert freed[1] == freed[0] + 1                               # freed within one step of the cancellation
    generated = metric(text, "telechat_generation_tokens_total") - metric(before, "telechat_generation_tokens_total")
    assert generated < 120
    prompt = random_ids(8, 13, tokenizer.vocab_size)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == _greedy(ref_model, tokenizer, prompt, 10)[0]


LONG = " ".join(f"w{i}" for i in range(400))
SHORT = [{"role": "user", "content": "hi"}]
BAD = [
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("negative max_tokens", "/v1/chat/completions", {"messages": SHORT, "max_tokens": -3}, 400, "max_tokens"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("system not first", "/v1/chat/completions", {"messages": SHORT + [{"role": "system", "content": "s"}]}, 400,
     "messages[1]"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4o", "messages": SHORT}, 404, "model"),
    ("prompt too long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("answer does not fit", "/v1/chat/completions", {"messages": SHORT, "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("unknown field", "/v1/chat/completions", {"messages": SHORT, "beam_width": 4}, 400, "beam_width"),
    ("unimplemented tool_choice", "/v1/chat/completions", {"messages": SHORT, "tool_choice": "required"}, 400,
     "tool_choice"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": SHORT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("temperature as text", "/v1/chat/completions", {"messages": SHORT, "temperature": "hot"}, 400, "temperature"),
    ("token id outside vocab", "/v1/completions", {"prompt": [5, 10 ** 6]}, 400, "prompt"),
    ("completion suffix", "/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("negative completion max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("released: last turn not user", "/generate", {"messages": SHORT + [{"role": "bot", "content": "x"}]}, 400,
     "messages"),
    ("released: unknown role", "/generate", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, None),
]


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, client, tokenizer):
    for name, path, body, status, param in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(server.url + path, timeout=30, **kw)
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, name
        assert err["param"] == param, (name, err)
        assert err["message"] and "Traceback" not in r.text and 'File "' not in r.text, name
        if param:
            assert param.split("[")[0] in err["message"], (name, err["message"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=SHORT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=-1)
    r = client.chat.completions.create(model=MODEL, messages=SHORT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def test_api_key_guards_the_api_with_401_json(server):
    from telechat_ms.serve.server import ServerThread
    guarded = ServerThread(dataclasses.replace(server.state, api_key="s3cret")).start()
    try:
        url = guarded.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                                                      {"messages": SHORT}),
                                       ("POST", "/generate", {"messages": SHORT}), ("POST", "/tokenize",
                                                                                    {"prompt": "x"})):
                r = httpx.request(method, url + path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "AuthenticationError" and r.headers["www-authenticate"]
        assert httpx.get(url + "/health").json() == {"code": 200}
        assert httpx.get(url + "/metrics").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        guarded.stop(shutdown_engine=False)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_a_tools_request_renders_exactly_the_released_tools_block(server, client, tokenizer):
    question = [{"role": "user", "content": "北京天气怎么样？"}]
    block = ("<_system>" + DEFAULT_SYSTEM_PROMPT + "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具"
             "来辅助你回答问题,以下是可用工具详情：\n<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n"
             "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
             "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
             "</tool_call>\n\n")
    r = httpx.post(server.url + "/tokenize", json={"messages": question, "tools": TOOLS}).json()
    assert r["tokens"] == tokenizer.encode(block + "<_user>北京天气怎么样？<_bot>")
    chat = client.chat.completions.create(model=MODEL, messages=question, tools=TOOLS, max_tokens=3, temperature=0)
    assert chat.usage.prompt_tokens == r["count"]
    history = question + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴，25度"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()
    turn = ("<_user>北京天气怎么样？<_bot><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n"
            "</tool_call><_end>\n<_user><tool_response>\n晴，25度\n</tool_response><_bot>")
    assert r["tokens"] == tokenizer.encode(block + turn)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_echo_logprobs_are_log_softmax_of_the_models_own_logits(server, ref_model, tokenizer):
    prompts = [random_ids(20, 50, tokenizer.vocab_size), random_ids(45, 51, tokenizer.vocab_size)]  # 45 > T
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 0}).json()
    assert r["usage"] == {"prompt_tokens": 65, "completion_tokens": 0, "total_tokens": 65}
    for choice, ids in zip(r["choices"], prompts):
        lp = choice["logprobs"]
        assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=False)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
        expected = _log_softmax(ref_model(ms.Tensor(np.array([ids], np.int32))).asnumpy()[0])
        got = np.array(lp["token_logprobs"][1:])
        assert np.abs(got - expected[np.arange(len(ids) - 1), ids[1:]]).max() <= 1e-5
        for i, top in enumerate(lp["top_logprobs"][1:]):   # keyed by text: ids with equal texts share a key
            assert max(top.values()) == pytest.approx(expected[i].max(), abs=1e-5)
            assert all(np.abs(expected[i] - v).min() <= 1e-5 for v in top.values())
        assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][-1] == len(choice["text"]) - \
            len(lp["tokens"][-1])
    by_id = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": prompts[1], "echo": True, "logprobs": 3, "max_tokens": 0,
                             "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    assert by_id["tokens"] == [f"token_id:{t}" for t in prompts[1]]
    for i, top in enumerate(by_id["top_logprobs"][1:]):
        best = np.argsort(-expected[i])[:3]
        assert {f"token_id:{t}" for t in best} <= set(top) and len(top) in (3, 4)
        assert all(abs(top[f"token_id:{t}"] - expected[i, t]) <= 1e-5 for t in best)
    # lm-evaluation-harness local-completions: context + continuation, max_tokens 1, logprobs 1
    ids = prompts[0]
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
                         "temperature": 0, "seed": 1234}).json()
    lps = r["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lps) == len(ids) + 1 and r["usage"]["completion_tokens"] == 1
    expected = _log_softmax(ref_model(ms.Tensor(np.array([ids], np.int32))).asnumpy()[0])
    assert abs(sum(lps[5:-1]) - expected[np.arange(4, len(ids) - 1), ids[5:]].sum()) <= 1e-4


def test_released_generate_json_and_sse_with_real_multi_turn(server, ref_model, tokenizer):
    messages = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！有什么可以帮你？"},
                {"role": "user", "content": "讲个故事"}]
    ids = _chat_ids(tokenizer, messages)
    assert len(ids) > len(_chat_ids(tokenizer, messages[-1:]))
    text, reason, count = _greedy(ref_model, tokenizer, ids, 100 - len(ids))
    r = httpx.post(server.url + "/generate", json={"messages": messages, "max_length": 100}, timeout=60).json()
    assert r["object"] == "chat.completion" and isinstance(r["created"], int)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert r["choices"][0]["finish_reason"] == reason and r["usage"]["prompt_tokens"] == len(ids)
    assert r["usage"]["completion_tokens"] == count
    with httpx.stream("POST", server.url + "/generate", timeout=60,
                      json={"messages": messages, "max_length": 100, "stream": True}) as resp:
        events = _sse(resp.iter_lines())
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": reason}
    assert httpx.get(server.url + "/health").json() == {"code": 200}


def test_stop_strings_and_seeded_sampling_over_http(client, tokenizer):
    prompt = random_ids(10, 14, tokenizer.vocab_size)
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = base[12:14]
    expected = base[:base.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\u2603"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    ask = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.9, seed=42, n=2)
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text


def test_models_tokenize_detokenize(server, client, tokenizer):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].model_extra["max_model_len"] == MAX_LEN
    text = "hello 世界 <_user>"
    tok = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json() == \
        {"prompt": tokenizer.decode(tok["tokens"], skip_special_tokens=False)}


def test_the_page_and_static_files_come_from_the_package_directory(server, tmp_path):
    import asyncio
    from telechat_ms.serve.app import create_app

    async def get(app, *paths):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.get(p) for p in paths]
    missing = asyncio.run(get(create_app(server.state, tmp_path / "absent"), "/", "/static/app.js"))
    for r in missing:
        assert r.status_code == 404 and "not installed" in r.json()["error"]["message"]
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text("<html>chat</html>", encoding="utf-8")
    (tmp_path / "static" / "app.js").write_text("let x = 1;", encoding="utf-8")
    page, script, absent = asyncio.run(get(create_app(server.state, tmp_path / "static"), "/", "/static/app.js",
                                           "/static/nope.js"))
    assert page.status_code == 200 and page.text == "<html>chat</html>" and "text/html" in page.headers["content-type"]
    assert script.status_code == 200 and script.text == "let x = 1;"
    assert absent.status_code == 404 and absent.json()["error"]["code"] == 404


def test_the_serve_command_binds_localhost_and_serves(serve_model_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOG_v": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "telechat_ms.cli", "serve", serve_model_dir, "--port", str(port),
                             "--max-model-len", "64", "--max-batch-size", "2", "--served-model-name", "cli-tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline, up = time.time() + 240, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                time.sleep(0.5)
        assert up, proc.stdout.read() if proc.poll() is not None else "server did not come up"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "cli-tiny", "prompt": [10, 11, 12],
                                                                         "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"on http://127.0.0.1:{port}" in out and "Traceback" not in out
