"""apply_chat_template against the released template's text, written out by hand from spec section 5."""
from __future__ import annotations

import pytest

from telechat_ms.data import apply_chat_template

# Literal copies (not imported) so a typo in the implementation cannot hide in both places.
DEFAULT_SYS = ("你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
               "（TeleAI）研发的人工智能助手。")
TOOLS_HEAD = "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
TOOLS_TAIL = ("</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
              "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
              "</tool_call>\n\n")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALC = {"name": "calc", "parameters": {"expr": "string"}}
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "查询天气", '
                '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}')
CALC_JSON = '{"name": "calc", "parameters": {"expr": "string"}}'


def test_single_turn_default_system():
    msgs = [{"role": "user", "content": "Q1"}]
    assert apply_chat_template(msgs) == "<_system>" + DEFAULT_SYS + "\n<_user>Q1"
    assert apply_chat_template(msgs, add_generation_prompt=True) == "<_system>" + DEFAULT_SYS + "\n<_user>Q1<_bot>"


def test_single_turn_with_system():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}]
    assert apply_chat_template(msgs, add_generation_prompt=True) == "<_system>SYS\n<_user>Q1<_bot>"
    assert apply_chat_template(msgs) == "<_system>SYS\n<_user>Q1"


def test_multi_turn_bot_alias_and_generation_prompt():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"},
            {"role": "bot", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert apply_chat_template(msgs, add_generation_prompt=True) == (
        "<_system>SYS\n<_user>Q1<_bot>A1<_end>\n<_user>Q2<_bot>")
    full = msgs + [{"role": "assistant", "content": "A2"}]
    assert apply_chat_template(full) == "<_system>SYS\n<_user>Q1<_bot>A1<_end>\n<_user>Q2<_bot>A2<_end>\n"


def test_tools_several_calls_consecutive_responses_chinese_arguments():
    msgs = [
        {"role": "user", "content": "北京和上海天气？"},
        {"role": "assistant", "content": "我来查一下。", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"name": "get_weather", "arguments": '{"city": "上海"}'}]},
        {"role": "tool", "content": "晴 25度"},
        {"role": "tool", "content": "雨 20度"},
        {"role": "assistant", "content": "北京晴，上海有雨。"},
        {"role": "user", "content": "算 1+2"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "calc", "arguments": {"expr": "1+2"}}]},
        {"role": "tool", "content": "3"},
    ]
    expected = (
        "<_system>" + DEFAULT_SYS + TOOLS_HEAD + WEATHER_JSON + "\n" + CALC_JSON + "\n" + TOOLS_TAIL
        + "<_user>北京和上海天气？"
        + "<_bot>我来查一下。<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>"
        + "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"上海\"}}\n</tool_call><_end>\n"
        + "<_user><tool_response>\n晴 25度\n</tool_response>\n<tool_response>\n雨 20度\n</tool_response>"
        + "<_bot>北京晴，上海有雨。<_end>\n"
        + "<_user>算 1+2"
        + "<_bot><tool_call>\n{\"name\": \"calc\", \"arguments\": {\"expr\": \"1+2\"}}\n</tool_call><_end>\n"
        + "<_user><tool_response>\n3\n</tool_response>"
    )
    assert apply_chat_template(msgs, tools=[WEATHER, CALC]) == expected
    assert apply_chat_template(msgs, tools=[WEATHER, CALC], add_generation_prompt=True) == expected + "<_bot>"


def test_tools_with_own_system_has_no_newline_before_tools_block():
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "hi"}]
    assert apply_chat_template(msgs, tools=[CALC], add_generation_prompt=True) == (
        "<_system>你是助手" + TOOLS_HEAD + CALC_JSON + "\n" + TOOLS_TAIL + "<_user>hi<_bot>")


def test_empty_tools_list_is_no_tools():
    msgs = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(msgs, tools=[]) == apply_chat_template(msgs)


@pytest.mark.parametrize("msgs, needle", [
    ([{"role": "narrator", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "messages[1]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], "messages[0].tool_calls"),
])
def test_bad_messages_name_the_message(msgs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        apply_chat_template(msgs)
