"""Generate the shipped demo data (telechat_ms/demo_data/): `python -m telechat_ms.data.demo_gen`.

Written for this project: small, deterministic, bilingual SFT conversations (single-turn, multi-turn,
tool calls) in the released TeleChat2 format and in OpenAI messages format, plus pretrain text.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from telechat_ms import special_tokens as st
from telechat_ms.chat_template import render_system, render_tool_call

OUT_DIR = Path(__file__).resolve().parents[1] / "demo_data"
DEFAULT_SYSTEM = st.DEFAULT_SYSTEM_PROMPT + "\n"

# (country zh, country en, capital zh, capital en, language zh, language en, continent zh, continent en)
COUNTRIES = [
    ("法国", "France", "巴黎", "Paris", "法语", "French", "欧洲", "Europe"),
    ("日本", "Japan", "东京", "Tokyo", "日语", "Japanese", "亚洲", "Asia"),
    ("埃及", "Egypt", "开罗", "Cairo", "阿拉伯语", "Arabic", "非洲", "Africa"),
    ("巴西", "Brazil", "巴西利亚", "Brasília", "葡萄牙语", "Portuguese", "南美洲", "South America"),
    ("加拿大", "Canada", "渥太华", "Ottawa", "英语和法语", "English and French", "北美洲", "North America"),
    ("澳大利亚", "Australia", "堪培拉", "Canberra", "英语", "English", "大洋洲", "Oceania"),
    ("德国", "Germany", "柏林", "Berlin", "德语", "German", "欧洲", "Europe"),
    ("印度", "India", "新德里", "New Delhi", "印地语和英语", "Hindi and English", "亚洲", "Asia"),
    ("肯尼亚", "Kenya", "内罗毕", "Nairobi", "斯瓦希里语和英语", "Swahili and English", "非洲", "Africa"),
    ("墨西哥", "Mexico", "墨西哥城", "Mexico City", "西班牙语", "Spanish", "北美洲", "North America"),
    ("意大利", "Italy", "罗马", "Rome", "意大利语", "Italian", "欧洲", "Europe"),
    ("韩国", "South Korea", "首尔", "Seoul", "韩语", "Korean", "亚洲", "Asia"),
]

CONCEPTS = [
    ("光合作用", "photosynthesis", "植物利用光能，把二氧化碳和水转化为葡萄糖并释放氧气的过程",
     "the process by which plants use light energy to turn carbon dioxide and water into glucose and oxygen"),
    ("机器学习", "machine learning", "让计算机从数据中学习规律、而不是依靠手写规则来完成任务的方法",
     "a way for computers to learn patterns from data instead of following hand-written rules"),
    ("通货膨胀", "inflation", "一段时间内物价总体水平持续上涨、货币购买力下降的现象",
     "a sustained rise in the general price level, which lowers the purchasing power of money"),
    ("万有引力", "gravity", "任何两个有质量的物体之间相互吸引的力",
     "the force by which any two objects with mass attract each other"),
    ("区块链", "blockchain", "一种按时间顺序把数据区块链接起来、难以篡改的分布式账本",
     "a distributed ledger that chains blocks of records in order so they are hard to alter"),
    ("蒸发", "evaporation", "液体表面的分子获得足够能量后变成气体的过程",
     "the process in which molecules at a liquid's surface gain enough energy to become a gas"),
    ("免疫系统", "the immune system", "人体识别并清除病原体和异常细胞的防御体系",
     "the body's defence network that recognises and removes pathogens and abnormal cells"),
    ("递归", "recursion", "函数在定义中调用自身、把问题拆成更小的同类问题来求解的方法",
     "a technique where a function calls itself to solve smaller instances of the same problem"),
]

TRANSLATIONS = [
    ("今天天气很好。", "The weather is nice today."), ("我喜欢读书。", "I like reading books."),
    ("请问火车站怎么走？", "Could you tell me how to get to the train station?"),
    ("这家餐厅的菜很好吃。", "The food at this restaurant is delicious."),
    ("我们明天上午九点开会。", "We have a meeting at nine tomorrow morning."),
    ("学习一门新语言需要耐心。", "Learning a new language takes patience."),
    ("他每天早上跑步。", "He goes running every morning."), ("谢谢你的帮助！", "Thank you for your help!"),
]

CODE_TASKS = [
    ("写一个Python函数，反转一个字符串。", "Write a Python function that reverses a string.",
     "def reverse_string(s: str) -> str:\n    return s[::-1]"),
    ("写一个Python函数，计算列表中所有数字的和。", "Write a Python function that sums a list of numbers.",
     "def total(numbers: list[float]) -> float:\n    result = 0\n    for x in numbers:\n        result += x\n"
     "    return result"),
    ("写一个Python函数，判断一个整数是否为质数。", "Write a Python function that checks whether an integer is prime.",
     "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
     "        if n % i == 0:\n            return False\n        i += 1\n    return True"),
    ("写一个Python函数，返回第n个斐波那契数。", "Write a Python function that returns the n-th Fibonacci number.",
     "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("写一个Python函数，统计字符串中每个字符出现的次数。", "Write a Python function that counts each character.",
     "from collections import Counter\n\ndef char_counts(s: str) -> dict[str, int]:\n    return dict(Counter(s))"),
]

TEACHER = "你是一位耐心的数学老师，回答时先给出思路，再给出结果。"
GUIDE = "You are a friendly travel guide. Answer briefly and mention one sight worth visiting."

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "查询指定城市当前的天气",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "城市名称"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
CALC_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression and return the number",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
FX_TOOL = {"type": "function", "function": {
    "name": "convert_currency", "description": "按实时汇率换算货币金额",
    "parameters": {"type": "object", "properties": {
        "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
        "required": ["amount", "from", "to"]}}}
WEATHER = ["晴", "多云", "小雨", "阴", "雷阵雨", "晴转多云"]
SIGHTS = {"Paris": "the Louvre", "Tokyo": "Senso-ji temple", "Cairo": "the Egyptian Museum",
          "Rome": "the Colosseum", "Berlin": "the Brandenburg Gate", "Seoul": "Gyeongbokgung Palace"}


def _rec(dialog: list[tuple[str, str]], system: str = DEFAULT_SYSTEM, tool: bool = False) -> dict:
    """A record in the released format (system text keeps its trailing newline, as in the released files)."""
    turns = [{"role": r, "content": c} for r, c in dialog]
    return {"system": system, "dialog": turns, "multiturn": len(turns) > 2, "tool": tool}


def _arith(rng: random.Random, zh: bool) -> tuple[str, str, int]:
    a, b = rng.randint(12, 99), rng.randint(11, 59)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    if zh:
        return f"{a} {sym} {b} 等于多少？", f"{a} {sym} {b} = {value}。", value
    return f"What is {a} {sym} {b}?", f"{a} {sym} {b} = {value}.", value


def single_turn(rng: random.Random) -> list[dict]:
    """Single-turn records: arithmetic, facts, concepts, unit conversion, translation, code."""
    out = []
    for i in range(24):
        q, a, _ = _arith(rng, zh=i % 2 == 0)
        out.append(_rec([("user", q), ("bot", a)], TEACHER if i % 4 == 0 else DEFAULT_SYSTEM))
    for c in COUNTRIES:
        out.append(_rec([("user", f"{c[0]}的首都是哪里？"), ("bot", f"{c[0]}的首都是{c[2]}。")]))
        out.append(_rec([("user", f"What is the capital of {c[1]}?"), ("bot", f"The capital of {c[1]} is {c[3]}.")]))
    for zh, en, dzh, den in CONCEPTS:
        out.append(_rec([("user", f"什么是{zh}？"), ("bot", f"{zh}是指{dzh}。")]))
        out.append(_rec([("user", f"Explain {en} in one sentence."), ("bot", f"{en[0].upper() + en[1:]} is {den}.")]))
    for _ in range(10):
        c = rng.randint(-10, 40)
        out.append(_rec([("user", f"{c}摄氏度等于多少华氏度？"),
                         ("bot", f"华氏度 = 摄氏度 × 9/5 + 32，所以 {c}°C = {c * 9 / 5 + 32:g}°F。")]))
        km = rng.randint(2, 300)
        out.append(_rec([("user", f"How many miles is {km} km?"),
                         ("bot", f"1 km is about 0.621371 miles, so {km} km is about {km * 0.621371:.2f} miles.")]))
    for zh, en in TRANSLATIONS:
        out.append(_rec([("user", f"把这句话翻译成英文：{zh}"), ("bot", en)]))
        out.append(_rec([("user", f"Translate into Chinese: {en}"), ("bot", zh)]))
    for zh, en, code in CODE_TASKS:
        out.append(_rec([("user", zh), ("bot", f"```python\n{code}\n```")]))
        out.append(_rec([("user", en), ("bot", f"Here is one way to do it:\n\n```python\n{code}\n```")]))
    return out


def multi_turn(rng: random.Random) -> list[dict]:
    """Multi-turn records: follow-up questions that depend on earlier turns."""
    out = []
    for c in COUNTRIES:
        out.append(_rec([("user", f"{c[0]}位于哪个大洲？"), ("bot", f"{c[0]}位于{c[6]}。"),
                         ("user", "那里的官方语言是什么？"), ("bot", f"{c[0]}的官方语言是{c[4]}。"),
                         ("user", "首都呢？"), ("bot", f"{c[0]}的首都是{c[2]}。")]))
        sight = SIGHTS.get(c[3])
        answer = f"{c[3]} is the capital of {c[1]}." + (f" Do not miss {sight}." if sight else "")
        out.append(_rec([("user", f"Which continent is {c[1]} in?"), ("bot", f"{c[1]} is in {c[7]}."),
                         ("user", "And its capital?"), ("bot", answer)], GUIDE if sight else DEFAULT_SYSTEM))
    for i in range(16):
        zh = i % 2 == 0
        q, a, v = _arith(rng, zh)
        k = rng.randint(2, 9)
        follow = (f"再乘以{k}呢？", f"{v} × {k} = {v * k}。") if zh else (f"And times {k}?", f"{v} × {k} = {v * k}.")
        out.append(_rec([("user", q), ("bot", a), ("user", follow[0]), ("bot", follow[1])],
                        TEACHER if zh else DEFAULT_SYSTEM))
    for zh, en, dzh, den in CONCEPTS:
        out.append(_rec([("user", f"什么是{zh}？"), ("bot", f"{zh}是指{dzh}。"),
                         ("user", "能用英文说一遍吗？"), ("bot", f"{en[0].upper() + en[1:]} is {den}.")]))
    return out


def _tool_system(tools: list[dict]) -> str:
    """The system text of a released tool record: the template's system block without <_system>."""
    return render_system(None, tools)[len(st.SYSTEM):]


def _call(name: str, args: dict) -> str:
    return render_tool_call({"name": name, "arguments": args})


def _resp(*payloads: dict) -> str:
    blocks = [f"{st.TOOL_RESPONSE_OPEN}\n{json.dumps(p, ensure_ascii=False)}\n{st.TOOL_RESPONSE_CLOSE}"
              for p in payloads]
    return "\n".join(blocks)


def tool_records(rng: random.Random) -> list[dict]:
    """Tool-call conversations in the released format (tags as plain text in the turns)."""
    out = []
    system = _tool_system([WEATHER_TOOL, CALC_TOOL, FX_TOOL])
    for c in COUNTRIES[:8]:
        w, t = rng.choice(WEATHER), rng.randint(-3, 33)
        out.append(_rec([
            ("user", f"{c[2]}现在天气怎么样？"),
            ("bot", _call("get_weather", {"city": c[2], "unit": "celsius"})),
            ("user", _resp({"city": c[2], "weather": w, "temperature": t})),
            ("bot", f"{c[2]}现在{w}，气温{t}°C。")], system, tool=True))
    for _ in range(6):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        out.append(_rec([
            ("user", f"Please compute {a} * {b} with the calculator."),
            ("bot", "I will use the calculator.\n" + _call("calculator", {"expression": f"{a} * {b}"})),
            ("user", _resp({"result": a * b})),
            ("bot", f"{a} × {b} = {a * b}.")], system, tool=True))
    for i in range(6):  # two calls in one turn, two responses in one user turn
        x, y = COUNTRIES[i][2], COUNTRIES[i + 6][2]
        wx, wy = rng.choice(WEATHER), rng.choice(WEATHER)
        tx, ty = rng.randint(0, 30), rng.randint(0, 30)
        warmer = x if tx >= ty else y
        out.append(_rec([
            ("user", f"比较一下{x}和{y}现在的气温。"),
            ("bot", _call("get_weather", {"city": x}) + "\n" + _call("get_weather", {"city": y})),
            ("user", _resp({"city": x, "weather": wx, "temperature": tx},
                           {"city": y, "weather": wy, "temperature": ty})),
            ("bot", f"{x}{wx}，{tx}°C；{y}{wy}，{ty}°C。{warmer}更暖和一些。"),
            ("user", "谢谢！"), ("bot", "不客气，出行愉快！")], system, tool=True))
    for _ in range(4):
        amount = rng.randint(10, 500) * 10
        rate = round(rng.uniform(6.9, 7.3), 4)
        out.append(_rec([
            ("user", f"{amount}美元能换多少人民币？"),
            ("bot", _call("convert_currency", {"amount": amount, "from": "USD", "to": "CNY"})),
            ("user", _resp({"amount": round(amount * rate, 2), "currency": "CNY", "rate": rate})),
            ("bot", f"按汇率{rate}计算，{amount}美元约为{amount * rate:.2f}元人民币。")], system, tool=True))
    return out


def messages_records(rng: random.Random) -> list[dict]:
    """OpenAI-style records: structured tool_calls, tool messages and a tools list."""
    out = []
    for c in COUNTRIES[:6]:
        t = rng.randint(5, 30)
        out.append({"tools": [WEATHER_TOOL], "messages": [
            {"role": "user", "content": f"What's the weather in {c[3]}?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                              "arguments": json.dumps({"city": c[3]})}}]},
            {"role": "tool", "content": json.dumps({"weather": "sunny", "temperature": t})},
            {"role": "assistant", "content": f"It is sunny in {c[3]}, {t}°C."}]})
    for i in range(6):  # two calls with Chinese arguments, answered by consecutive tool messages
        x, y = COUNTRIES[i][2], COUNTRIES[11 - i][2]
        tx, ty = rng.randint(0, 30), rng.randint(0, 30)
        out.append({"tools": [WEATHER_TOOL, CALC_TOOL], "messages": [
            {"role": "system", "content": st.DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": f"{x}和{y}哪里更热？"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"name": "get_weather", "arguments": {"city": x}}, {"name": "get_weather", "arguments": {"city": y}}]},
            {"role": "tool", "content": json.dumps({"city": x, "temperature": tx}, ensure_ascii=False)},
            {"role": "tool", "content": json.dumps({"city": y, "temperature": ty}, ensure_ascii=False)},
            {"role": "assistant", "content": f"{x}{tx}°C，{y}{ty}°C，" + (
                "两地一样热。" if tx == ty else f"{x if tx > ty else y}更热。")}]})
    for zh, en in TRANSLATIONS[:6]:
        out.append({"messages": [{"role": "system", "content": "You are a precise translator."},
                                 {"role": "user", "content": f"Translate: {zh}"},
                                 {"role": "assistant", "content": en}]})
    return out


def pretrain_docs() -> list[dict]:
    """Short encyclopedic paragraphs (Chinese and English) for the pretrain demo file."""
    docs = []
    for c in COUNTRIES:
        docs.append({"text": f"{c[0]}是位于{c[6]}的国家，首都是{c[2]}，官方语言是{c[4]}。"
                             f"{c[2]}是{c[0]}的政治和文化中心之一，每年吸引大量游客。"})
        docs.append({"text": f"{c[1]} is a country in {c[7]}. Its capital is {c[3]} and its official language is "
                             f"{c[5]}. {c[3]} is one of the country's political and cultural centres."})
    for zh, en, dzh, den in CONCEPTS:
        docs.append({"text": f"{zh}是指{dzh}。理解{zh}有助于我们认识世界。"})
        docs.append({"text": f"In short, {en} is {den}. Understanding {en} helps explain many everyday things."})
    for zh, en in TRANSLATIONS:
        docs.append({"text": f"{zh} {en}"})
    return docs


def generate(out_dir: Path = OUT_DIR) -> dict[str, int]:
    """Write sft_demo.jsonl, sft_demo_messages.jsonl, pretrain_demo.jsonl and the mix files; returns counts."""
    rng = random.Random(20240920)
    sft = single_turn(rng) + multi_turn(rng) + tool_records(rng)
    rng.shuffle(sft)
    files = {"sft_demo.jsonl": sft, "sft_demo_messages.jsonl": messages_records(rng),
             "pretrain_demo.jsonl": pretrain_docs()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out_dir / name).write_text(text, encoding="utf-8")
    (out_dir / "demo_mix.json").write_text(
        json.dumps({"sft_demo.jsonl": 1.0, "sft_demo_messages.jsonl": 1.5}, indent=2) + "\n", encoding="utf-8")
    (out_dir / "pretrain_mix.json").write_text(json.dumps({"pretrain_demo.jsonl": 2.0}, indent=2) + "\n",
                                               encoding="utf-8")
    return {name: len(records) for name, records in files.items()}


if __name__ == "__main__":
    print(generate())
