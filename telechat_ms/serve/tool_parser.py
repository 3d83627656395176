"""Tool calls in the released format (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, spec 5/8)
turned into OpenAI `tool_calls`, for whole answers and for streams.

A block whose JSON does not parse as {"name": str, "arguments": ...} stays text: the user sees what the model wrote
rather than a call that was never made. Streams: text before the first `<tool_call>` goes out as it comes; from
that tag on the answer is held back and parsed when the answer ends (each call is sent whole, which OpenAI
clients accumulate like any other delta).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from telechat_ms.special_tokens import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)


@dataclass
class ToolCall:
    """One parsed call: an id for the tool message that answers it, the function name, arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_block(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return ToolCall(new_call_id(), obj["name"], args)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content without the parsed call blocks, None when nothing but whitespace is left; the calls). The
    whitespace that separates consecutive calls is not content."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        call = _parse_block(match.group(1))
        if call is None:
            continue
        gap = text[pos:match.start()]
        if not (calls and not gap.strip()):
            content.append(gap)
        calls.append(call)
        pos = match.end()
    content.append(text[pos:])
    rest = "".join(content)
    if not calls:
        return text, []
    return (rest if rest.strip() else None), calls


class ToolCallStream:
    """Streams content up to the first `<tool_call>` (never half a tag); parses the held rest at the end."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.held_from: int | None = None

    def feed(self, piece: str) -> str:
        """Content that can go out now."""
        self.text += piece
        if self.held_from is None:
            at = self.text.find(TOOL_CALL_OPEN, self.sent)
            if at >= 0:
                self.held_from = at
            else:
                keep = next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.text)), 0, -1)
                             if self.text.endswith(TOOL_CALL_OPEN[:k])), 0)
                end = len(self.text) - keep
                out, self.sent = self.text[self.sent:end], max(self.sent, end)
                return out
        out, self.sent = self.text[self.sent:self.held_from], max(self.sent, self.held_from)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining content, calls) at the end of the answer."""
        rest = self.text[self.sent:]
        if self.held_from is None:
            return rest, []
        content, calls = parse_tool_calls(rest)
        return (content or ""), calls
