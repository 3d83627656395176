"""TeleChat2 special tokens, their ids and the default system prompt: the one place these facts live (spec 4, 5)."""
from __future__ import annotations

UNK = "<_unk>"
START = "<_start>"
END = "<_end>"
PAD = "<_pad>"
USER = "<_user>"
BOT = "<_bot>"
SYSTEM = "<_system>"
OBSERVATION = "<_observation>"
SEP = "<_sep>"

# Exact ids of the released 131072-piece model (and of every tokenizer train_tokenizer.py builds).
SPECIAL_TOKENS: tuple[str, ...] = (UNK, START, END, PAD, USER, BOT, SYSTEM, OBSERVATION, SEP)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
USER_ID, BOT_ID, SYSTEM_ID, OBSERVATION_ID, SEP_ID = 4, 5, 6, 7, 8

# Label value the loss ignores (HF / MindFormers convention).
IGNORE_INDEX = -100

# Tool-call tags are plain text in the released model (not pieces): kept here only so no module re-spells them.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

DEFAULT_SYSTEM_PROMPT = (
    "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
    "（TeleAI）研发的人工智能助手。"
)

# The released template's tools section, split around the list of tool JSON lines (spec 5).
TOOLS_HEADER = (
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n"
)
