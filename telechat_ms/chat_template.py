"""The released TeleChat2 chat template (spec 5), one implementation for inference prompts and training data."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from telechat_ms import special_tokens as st

ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "bot": "assistant", "tool": "tool"}


def to_json(obj: Any) -> str:
    """Serialise like the template's `tojson`: non-ASCII kept, insertion order, ', ' and ': ' separators."""
    return json.dumps(obj, ensure_ascii=False)


def normalize_tool_call(call: Mapping[str, Any]) -> tuple[str, str]:
    """Return (name, arguments JSON text) of a {name, arguments} or OpenAI {function: {...}} tool call."""
    if type(call) is not dict and not isinstance(call, Mapping):
        raise ValueError(f"tool call must be an object, got {type(call).__name__}")
    if "function" in call and isinstance(call["function"], Mapping):
        call = call["function"]
    if not isinstance(call.get("name"), str):
        raise ValueError("tool call needs a string 'name'")
    args = call.get("arguments", {})
    # A string is inserted verbatim (the template's `is string` branch); anything else is serialised.
    return call["name"], args if isinstance(args, str) else to_json(args)


def render_tool_call(call: Mapping[str, Any]) -> str:
    """One call as the released model writes it: <tool_call>\\n{"name": "N", "arguments": A}\\n</tool_call>."""
    name, args = normalize_tool_call(call)
    return f'{st.TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{st.TOOL_CALL_CLOSE}'


def render_system(system: str | None, tools: Sequence[Any] | None = None) -> str:
    """The system block: <_system> + text + \\n, or with tools: <_system> + text + the tools section."""
    text = st.DEFAULT_SYSTEM_PROMPT if system is None else system
    if not tools:
        return f"{st.SYSTEM}{text}\n"
    lines = "".join(to_json(tool) + "\n" for tool in tools)
    return f"{st.SYSTEM}{text}{st.TOOLS_HEADER}{lines}{st.TOOLS_FOOTER}"


def _role(message: Mapping[str, Any], index: int) -> str:
    """Canonical role of message `index` (assistant for 'bot'); ValueError names the message."""
    if type(message) is not dict and not isinstance(message, Mapping):  # dict first: abc checks are slow
        raise ValueError(f"messages[{index}]: expected an object, got {type(message).__name__}")
    role = ROLE_ALIASES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise ValueError(f"messages[{index}].role: unknown role {message.get('role')!r} "
                         f"(expected one of {sorted(ROLE_ALIASES)})")
    return role


def _content(message: Mapping[str, Any], index: int, required: bool = True) -> str:
    """Text content of a message; None allowed only where the template tolerates it (assistant turns)."""
    content = message.get("content")
    if content is None and not required:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}].content: expected a string, got {type(content).__name__}")
    return content


def render_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> list[str]:
    """Render messages into parts [system block, turn 1, turn 2, ...]; joined they are the template's text."""
    if type(messages) is not list and (isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence)):
        raise ValueError("messages must be a list of {role, content} objects")
    roles = [_role(m, i) for i, m in enumerate(messages)]
    system = None
    if roles and roles[0] == "system":
        system = _content(messages[0], 0)
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            raise ValueError(f"messages[{i}]: a system message may only be the first message")
    parts = [render_system(system, tools)]
    for i, (message, role) in enumerate(zip(messages, roles)):
        if role == "user":
            parts.append(st.USER + _content(message, i))
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if type(calls) is not list and (not isinstance(calls, Sequence) or isinstance(calls, (str, bytes))):
                raise ValueError(f"messages[{i}].tool_calls: expected a list")
            try:
                rendered_calls = "\n".join(render_tool_call(c) for c in calls)
            except ValueError as exc:
                raise ValueError(f"messages[{i}].tool_calls: {exc}") from None
            parts.append(st.BOT + _content(message, i, required=False) + rendered_calls + st.END + "\n")
        elif role == "tool":
            opening = "\n" if i > 0 and roles[i - 1] == "tool" else st.USER
            parts.append(f"{opening}{st.TOOL_RESPONSE_OPEN}\n{_content(message, i)}\n{st.TOOL_RESPONSE_CLOSE}")
    return parts


def apply_chat_template(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                        add_generation_prompt: bool = False) -> str:
    """Render a conversation exactly as the released TeleChat2 chat template does (no BOS)."""
    text = "".join(render_messages(messages, tools))
    return text + st.BOT if add_generation_prompt else text
