// The TeleChat2 web chat: streams answers from this server's OpenAI-compatible /v1/chat/completions (SSE), sends
// the whole conversation (system prompt + every turn) as `messages`, and shows model output as text or as Markdown
// built from DOM nodes (TeleMarkdown): model text is never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
    status: $("status"), model: $("model-name"), system: $("system-prompt"), markdown: $("render-markdown"),
    apiKey: $("api-key"), composer: $("composer"),
  };
  const state = { model: null, maxLen: null, history: [], controller: null, views: [] };

  function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.dataset.kind = kind || "";
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return response.status + " " + response.statusText;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) throw new Error(await errorText(response));
      const body = await response.json();
      state.model = body.data[0].id;
      state.maxLen = body.data[0].max_model_len || null;
      ui.model.textContent = state.model;
      setStatus("ready", "ready");
    } catch (e) {
      setStatus("cannot reach the model: " + e.message, "error");
    }
  }

  // ---------------------------------------------------------------------------------------- message views
  function render(view) {
    const content = view.message.content;
    if (ui.markdown.checked && view.message.role === "assistant") {
      view.body.replaceChildren(TeleMarkdown.render(content));
    } else {
      view.body.replaceChildren(document.createTextNode(content));
    }
  }

  function addView(message, phase) {
    const box = document.createElement("div");
    box.className = "message " + message.role;
    box.dataset.role = message.role;
    box.dataset.state = phase;
    const head = document.createElement("div");
    head.className = "head";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = message.role === "user" ? "You" : "TeleChat2";
    const meta = document.createElement("span");
    meta.className = "meta";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    head.append(who, meta, copy);
    const body = document.createElement("div");
    body.className = "content";
    box.append(head, body);
    ui.messages.appendChild(box);
    const view = { message, box, body, meta, copy };
    copy.addEventListener("click", () => copyText(view));
    state.views.push(view);
    render(view);
    return view;
  }

  async function copyText(view) {
    const value = view.message.content;
    try {
      await navigator.clipboard.writeText(value);
    } catch (e) {  // no clipboard permission (or not a secure context): the selection fallback
      const area = document.createElement("textarea");
      area.value = value;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    view.copy.textContent = "Copied";
    view.box.dataset.copied = "1";
    setTimeout(() => { view.copy.textContent = "Copy"; }, 1500);
  }

  function scrollDown() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // ---------------------------------------------------------------------------------------- a request
  // An empty field is not sent: the server then uses the model's generation_config.json (as vLLM does).
  function number(id, parse) {
    const raw = $(id).value.trim();
    const value = raw === "" ? NaN : parse(raw);
    return Number.isFinite(value) ? value : undefined;
  }

  function requestBody() {
    const messages = [];
    if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
    for (const m of state.history) messages.push({ role: m.role, content: m.content });
    const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
    const fields = { temperature: ["temperature", parseFloat], top_p: ["top-p", parseFloat],
                     top_k: ["top-k", (v) => parseInt(v, 10)], max_tokens: ["max-tokens", (v) => parseInt(v, 10)],
                     repetition_penalty: ["repetition-penalty", parseFloat] };
    for (const [name, [id, parse]] of Object.entries(fields)) {
      const value = number(id, parse);
      if (value !== undefined) body[name] = value;
    }
    if (body.top_k === 0) body.top_k = -1;  // vLLM's "off"
    return body;
  }

  // Server-sent events: `data: {json}` lines separated by blank lines, ending with `data: [DONE]`.
  async function readStream(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onEvent(JSON.parse(data));
      }
    }
    return false;
  }

  // ---------------------------------------------------------------------------------------- fitting the context
  // The conversation is sent whole; when it no longer fits the model's context (prompt tokens counted by the
  // server's /tokenize, plus room for the answer: max tokens, or a quarter of the context up to 512), the oldest
  // turns are dropped (the system prompt is kept) and the page says so.
  async function countTokens(messages) {
    const response = await fetch("/tokenize", { method: "POST", headers: headers(),
      body: JSON.stringify({ model: state.model, messages, add_generation_prompt: true }) });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    state.maxLen = body.max_model_len;
    return body.count;
  }

  function answerRoom(body) {
    if (body.max_tokens !== undefined) return body.max_tokens;
    return Math.max(1, Math.min(512, Math.floor(state.maxLen / 4)));
  }

  function markDropped(message) {
    const view = state.views.find((v) => v.message === message);
    if (view) {
      view.box.dataset.dropped = "1";
      view.box.classList.add("dropped");
    }
  }

  async function fitHistory(beforeBox) {
    let dropped = 0;
    for (;;) {
      const body = requestBody();
      const count = await countTokens(body.messages);
      if (count + answerRoom(body) <= state.maxLen || state.history.length <= 1) {
        if (dropped) {
          const note = document.createElement("div");
          note.className = "notice";
          note.dataset.dropped = String(dropped);
          note.textContent = "The conversation no longer fits the model's context of " + state.maxLen +
            " tokens: its " + dropped + " oldest message" + (dropped > 1 ? "s were" : " was") +
            " dropped (the system prompt is kept). The model no longer sees them.";
          ui.messages.insertBefore(note, beforeBox);
        }
        return body;
      }
      let n = 1;  // one turn: a user message and the answers after it
      while (n < state.history.length - 1 && state.history[n].role !== "user") n += 1;
      state.history.splice(0, n).forEach(markDropped);
      dropped += n;
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
  }

  async function send() {
    const text = ui.prompt.value;
    if (!text.trim() || state.controller) return;
    if (!state.model) await loadModel();
    if (!state.model) return;
    const user = { role: "user", content: text };
    state.history.push(user);
    const userView = addView(user, "done");
    ui.prompt.value = "";
    const answer = { role: "assistant", content: "" };
    const view = addView(answer, "streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("generating", "busy");
    const started = performance.now();
    let firstToken = null;
    let pieces = 0;
    let finish = null;
    try {
      const body = await fitHistory(userView.box);
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
      if (!response.ok) throw new Error(await errorText(response));
      const complete = await readStream(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message || "server error");
        if (chunk.usage) {
          view.box.dataset.promptTokens = chunk.usage.prompt_tokens;
          view.box.dataset.completionTokens = chunk.usage.completion_tokens;
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstToken === null) firstToken = performance.now();
          answer.content += piece;
          pieces += 1;
          view.box.dataset.pieces = pieces;
          render(view);
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
      if (!complete) throw new Error("the stream ended before [DONE]");
      view.box.dataset.state = "done";
      view.box.dataset.finish = finish || "";
      const seconds = (performance.now() - started) / 1000;
      const usage = view.box.dataset.completionTokens;
      view.meta.textContent = (usage ? usage + " tokens, " : "") + seconds.toFixed(1) + " s" +
        (firstToken !== null ? ", first token " + ((firstToken - started) / 1000).toFixed(2) + " s" : "") +
        (finish === "length" ? " (max tokens reached)" : "");
      setStatus("ready", "ready");
    } catch (e) {
      if (e.name === "AbortError") {
        view.box.dataset.state = "stopped";
        view.meta.textContent = "stopped";
        setStatus("stopped", "ready");
      } else {
        controller.abort();  // release the server's row if the stream was still open
        view.box.dataset.state = "error";
        const note = document.createElement("div");
        note.className = "error";
        note.textContent = e.message;
        view.box.appendChild(note);
        setStatus("error", "error");
      }
    } finally {
      if (!state.views.includes(view)) {
        // cleared while streaming: the conversation this answer belonged to is gone
      } else if (view.box.dataset.state === "error" && !answer.content) {
        state.history.pop();  // nothing came back: the turn is not part of the conversation
      } else {
        state.history.push(answer);  // a stopped answer stays as far as it got, as the model saw it
      }
      state.controller = null;
      setBusy(false);
      ui.prompt.focus();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function clear() {
    stop();
    state.history = [];
    state.views = [];
    ui.messages.replaceChildren();
    setStatus(state.model ? "ready" : "connecting", state.model ? "ready" : "");
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.clear.addEventListener("click", clear);
  ui.markdown.addEventListener("change", () => state.views.forEach(render));
  ui.apiKey.addEventListener("change", loadModel);
  loadModel();
})();
