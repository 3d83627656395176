"""Validated training records from jsonl lines: released SFT, pretrain text, OpenAI messages, MindSpore input/output."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from telechat_ms import special_tokens as st
from telechat_ms.chat_template import ROLE_ALIASES, normalize_tool_call
from telechat_ms.errors import DataError

TASKS = ("sft", "pretrain")


@dataclass
class Example:
    """One validated record: a chat (messages + tools) or a pretrain text, with its file:line."""

    where: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None
    text: str | None = None
    prompt: str | None = None        # pretrain {"prompt", "completion"}: text = prompt + completion, prompt unsupervised
    is_tool: bool = False

    @property
    def is_chat(self) -> bool:
        """True for SFT conversations, False for pretrain documents."""
        return self.text is None

    @property
    def packable(self) -> bool:
        """Single-turn, non-tool chats (and pretrain documents) may share a sequence with others."""
        if not self.is_chat:
            return True
        roles = [m["role"] for m in self.messages if m["role"] != "system"]
        return not self.is_tool and roles == ["user", "assistant"]

    @property
    def system(self) -> str | None:
        """System text of a chat (None means the default system prompt): the packing group key."""
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None


def _fail(where: str, reason: str) -> DataError:
    return DataError(f"{where}: {reason}")


def _check_text(value: Any, where: str, name: str) -> str:
    """A string field free of reserved control strings (they would corrupt roles and loss masks)."""
    if not isinstance(value, str):
        raise _fail(where, f"{name}: expected a string, got {type(value).__name__}")
    if "<_" in value:  # cheap pre-check: every special token starts with "<_"
        for tok in st.SPECIAL_TOKENS:
            if tok in value:
                raise _fail(where, f"{name}: contains the reserved token {tok!r}")
    return value


def _check_bool(record: Mapping[str, Any], key: str, where: str) -> bool:
    value = record.get(key, False)
    if not isinstance(value, bool):
        raise _fail(where, f"{key}: expected true/false, got {value!r}")
    return value


def _system_message(system: Any, where: str) -> list[dict[str, Any]]:
    """Released records store the system text with its trailing newline; the template adds it back."""
    if system is None:
        return []
    text = _check_text(system, where, "system")
    if text.endswith("\n"):
        text = text[:-1]
    return [{"role": "system", "content": text}]


def _parse_released(record: Mapping[str, Any], where: str) -> Example:
    """{system, dialog[{role: user|bot, content}], multiturn, tool}: alternating turns ending with the bot."""
    dialog = record["dialog"]
    if not isinstance(dialog, list):
        raise _fail(where, f"dialog: expected a list, got {type(dialog).__name__}")
    if not dialog:
        raise _fail(where, "dialog: empty")
    messages = _system_message(record.get("system"), where)
    for i, turn in enumerate(dialog):
        name = f"dialog[{i}]"
        if not isinstance(turn, dict):
            raise _fail(where, f"{name}: expected an object")
        for key in ("role", "content"):
            if key not in turn:
                raise _fail(where, f"{name}: missing field {key!r}")
        role = turn["role"]
        if role not in ("user", "bot", "assistant"):
            raise _fail(where, f"{name}.role: unknown role {role!r} (expected 'user' or 'bot')")
        expected = "user" if i % 2 == 0 else "assistant"
        if ROLE_ALIASES[role] != expected:
            raise _fail(where, f"{name}.role: turns must alternate user, bot, ... (found {role!r})")
        messages.append({"role": ROLE_ALIASES[role], "content": _check_text(turn["content"], where, f"{name}.content")})
    if messages[-1]["role"] != "assistant":
        raise _fail(where, "dialog: must end with a bot turn (nothing to learn otherwise)")
    is_tool = _check_bool(record, "tool", where) or _mentions_tools(messages)
    _check_bool(record, "multiturn", where)
    return Example(where=where, messages=messages, is_tool=is_tool)


def _mentions_tools(messages: list[dict[str, Any]]) -> bool:
    """Tool conversations written as plain text (released data) are recognised by their tags."""
    tags = (st.TOOL_CALL_OPEN, st.TOOL_RESPONSE_OPEN)
    return any(tag in (m.get("content") or "") for m in messages for tag in tags)


def _parse_messages(record: Mapping[str, Any], where: str) -> Example:
    """OpenAI-style {"messages": [...], "tools": [...]} with optional assistant tool_calls."""
    raw = record["messages"]
    if not isinstance(raw, list):
        raise _fail(where, f"messages: expected a list, got {type(raw).__name__}")
    if not raw:
        raise _fail(where, "messages: empty")
    messages: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        name = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _fail(where, f"{name}: expected an object")
        if "role" not in msg:
            raise _fail(where, f"{name}: missing field 'role'")
        role = ROLE_ALIASES.get(msg["role"])
        if role is None:
            raise _fail(where, f"{name}.role: unknown role {msg['role']!r} (expected one of {sorted(ROLE_ALIASES)})")
        if role == "system" and i != 0:
            raise _fail(where, f"{name}: a system message may only be the first message")
        out: dict[str, Any] = {"role": role}
        calls = msg.get("tool_calls") if role == "assistant" else None
        if calls:
            if not isinstance(calls, list):
                raise _fail(where, f"{name}.tool_calls: expected a list")
            for j, call in enumerate(calls):
                try:
                    _check_text(normalize_tool_call(call)[1], where, f"{name}.tool_calls[{j}].arguments")
                except ValueError as exc:
                    if isinstance(exc, DataError):
                        raise
                    raise _fail(where, f"{name}.tool_calls[{j}]: {exc}") from None
            out["tool_calls"] = list(calls)
        content = msg.get("content")
        if content is None and (calls or role == "assistant" and "content" in msg):
            content = ""
        if content is None:
            raise _fail(where, f"{name}: missing field 'content'")
        out["content"] = _check_text(content, where, f"{name}.content")
        messages.append(out)
    if messages[-1]["role"] != "assistant":
        raise _fail(where, "messages: must end with an assistant turn (nothing to learn otherwise)")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _fail(where, f"tools: expected a list, got {type(tools).__name__}")
    is_tool = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    return Example(where=where, messages=messages, tools=tools or None, is_tool=is_tool or _mentions_tools(messages))


def _parse_input_output(record: Mapping[str, Any], where: str) -> Example:
    """The MindSpore port's {"input", "output"} single turn (default system prompt unless "system" is given)."""
    messages = _system_message(record.get("system"), where)
    messages.append({"role": "user", "content": _check_text(record["input"], where, "input")})
    messages.append({"role": "assistant", "content": _check_text(record["output"], where, "output")})
    return Example(where=where, messages=messages, is_tool=_mentions_tools(messages))


def parse_record(record: Any, where: str, task: str = "sft") -> Example:
    """Validate one decoded JSON record for `task`; DataError names `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise _fail(where, f"expected a JSON object, got {type(record).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    if "prompt" in record or "completion" in record:
        # TRL's prompt-completion records, in either task: plain text (no chat template), the loss on the completion
        for key in ("prompt", "completion"):
            if key not in record:
                raise _fail(where, f"missing field {key!r} (prompt-completion records are "
                                   f"{{\"prompt\": ..., \"completion\": ...}})")
        prompt = _check_text(record["prompt"], where, "prompt")
        completion = _check_text(record["completion"], where, "completion")
        if not completion:
            raise _fail(where, "completion: empty (nothing to learn)")
        return Example(where=where, text=prompt + completion, prompt=prompt)
    if task == "pretrain":
        if "text" not in record:
            raise _fail(where, "missing field 'text' (pretrain records are {\"text\": ...} or "
                               "{\"prompt\": ..., \"completion\": ...})")
        text = _check_text(record["text"], where, "text")
        if not text:
            raise _fail(where, "text: empty")
        return Example(where=where, text=text)
    if "dialog" in record:
        return _parse_released(record, where)
    if "messages" in record:
        return _parse_messages(record, where)
    if "input" in record or "output" in record:
        for key in ("input", "output"):
            if key not in record:
                raise _fail(where, f"missing field {key!r}")
        return _parse_input_output(record, where)
    if "text" in record:
        raise _fail(where, "a pretrain {\"text\"} record in an SFT file (use --task pretrain)")
    raise _fail(where, "missing field 'dialog' (expected {system, dialog}, {messages} or {input, output})")


def parse_line(line: str, where: str, task: str = "sft") -> Example:
    """Decode and validate one jsonl line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    return parse_record(record, where, task)
