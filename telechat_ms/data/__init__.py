"""TeleChat2 data: tokenizer, chat template, record formats, data mix, packing and MindRecord I/O.

Nothing here imports MindSpore at import time (only the MindRecord writer/reader functions do, when called).
"""
from telechat_ms.chat_template import apply_chat_template, render_system, render_tool_call
from telechat_ms.data.formats import Example, parse_line, parse_record
from telechat_ms.data.mindrecord import iter_mindrecord, list_shards, read_mindrecord
from telechat_ms.data.mix import MixEntry, load_mix, select_indices
from telechat_ms.data.pack import (PackOptions, chunk_documents, materialize, materialize_compact, pad_row,
                                  plan_sequences, sample_boundaries)
from telechat_ms.data.process import ProcessOptions, process_data
from telechat_ms.data.render import Encoded, encode_example, loss_mask, render_training_text
from telechat_ms.special_tokens import (DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, SPECIAL_TOKEN_IDS,
                                             SPECIAL_TOKENS)
from telechat_ms.data.tokenizer import TeleChatTokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "SPECIAL_TOKENS", "SPECIAL_TOKEN_IDS",
    "Encoded", "Example", "MixEntry", "PackOptions", "ProcessOptions", "TeleChatTokenizer",
    "apply_chat_template", "chunk_documents", "encode_example", "iter_mindrecord", "list_shards", "load_mix",
    "loss_mask", "materialize", "materialize_compact", "pad_row", "parse_line", "parse_record", "plan_sequences",
    "process_data",
    "read_mindrecord", "render_system", "render_tool_call", "render_training_text", "sample_boundaries",
    "select_indices",
]
