"""What an HF export carries besides weights and config fields (spec 9): our own transformers configuration and
tokenizer modules (copied into the export for `trust_remote_code`), their auto_map entries, the tokenizer_config and
special_tokens_map a transformers / vLLM user loads, and the chat template as Jinja.

The two module files are standalone (transformers + sentencepiece only): an export must work without telechat_ms.
This package itself imports only special_tokens, so config.py and weights.py can use it.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from telechat_ms import special_tokens as st

CONFIG_MODULE, CONFIG_CLASS = "configuration_telechat2", "Telechat2Config"
TOKENIZER_MODULE, TOKENIZER_CLASS = "tokenization_telechat2", "Telechat2Tokenizer"
CONFIG_CODE_FILE, TOKENIZER_CODE_FILE = CONFIG_MODULE + ".py", TOKENIZER_MODULE + ".py"
# vLLM's registry name for TeleChat2 (vllm/model_executor/models/registry.py). The released config says
# "TelechatForCausalLM", which that registry does not know; transformers ignores `architectures` when loading.
ARCHITECTURE = "TeleChat2ForCausalLM"
CONFIG_AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.{CONFIG_CLASS}"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [f"{TOKENIZER_MODULE}.{TOKENIZER_CLASS}", None]}
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE = "tokenizer_config.json", "special_tokens_map.json"
_HERE = os.path.dirname(os.path.abspath(__file__))


def write_config_code(directory: str) -> str:
    """Copy the configuration module into `directory` (config.json's auto_map points at it)."""
    shutil.copyfile(os.path.join(_HERE, CONFIG_CODE_FILE), os.path.join(directory, CONFIG_CODE_FILE))
    return CONFIG_CODE_FILE


def _token(content: str) -> dict[str, Any]:
    """A control string as transformers serialises an AddedToken: kept whole, never stripped."""
    return {"content": content, "lstrip": False, "rstrip": False, "single_word": False, "normalized": False,
            "special": True}


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json of an export: our slow tokenizer, no BOS/EOS added, the chat template inside."""
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "auto_map": TOKENIZER_AUTO_MAP,
        "add_bos_token": False,
        "add_eos_token": False,
        "use_fast": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "sp_model_kwargs": {},
        "unk_token": st.UNK, "bos_token": st.START, "eos_token": st.END, "pad_token": st.PAD,
        "additional_special_tokens": [st.USER, st.BOT, st.SYSTEM, st.OBSERVATION, st.SEP],
        "added_tokens_decoder": {str(i): _token(t) for t, i in st.SPECIAL_TOKEN_IDS.items()},
        "chat_template": chat_template(),
    }


def special_tokens_map() -> dict[str, Any]:
    """special_tokens_map.json of an export."""
    return {"unk_token": _token(st.UNK), "bos_token": _token(st.START), "eos_token": _token(st.END),
            "pad_token": _token(st.PAD),
            "additional_special_tokens": [_token(t) for t in (st.USER, st.BOT, st.SYSTEM, st.OBSERVATION, st.SEP)]}


def write_tokenizer_code(directory: str, model_max_length: int) -> list[str]:
    """Write the tokenizer module, tokenizer_config.json and special_tokens_map.json into `directory` (which must
    already hold tokenizer.model). Returns the names written."""
    shutil.copyfile(os.path.join(_HERE, TOKENIZER_CODE_FILE), os.path.join(directory, TOKENIZER_CODE_FILE))
    for name, data in ((TOKENIZER_CONFIG_FILE, tokenizer_config(model_max_length)),
                       (SPECIAL_TOKENS_MAP_FILE, special_tokens_map())):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return [TOKENIZER_CODE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE]


def _lit(text: str) -> str:
    """A Jinja string literal for `text` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def chat_template() -> str:
    """The released chat template (spec 5) as Jinja for transformers' apply_chat_template and vLLM's chat endpoint,
    built from the same constants as telechat_ms.chat_template (tests check both render the same text)."""
    nl = _lit("\n")
    return "".join([
        "{%- set ns = namespace(system=", _lit(st.DEFAULT_SYSTEM_PROMPT), ") -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- endif -%}",
        "{{- ", _lit(st.SYSTEM), " + ns.system -}}",
        "{%- if tools -%}{{- ", _lit(st.TOOLS_HEADER), " -}}",
        "{%- for tool in tools -%}{{- tool | tojson -}}{{- ", nl, " -}}{%- endfor -%}",
        "{{- ", _lit(st.TOOLS_FOOTER), " -}}",
        "{%- else -%}{{- ", nl, " -}}{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'user' -%}{{- ", _lit(st.USER), " + message['content'] -}}",
        "{%- elif message['role'] in ['assistant', 'bot'] -%}",
        "{{- ", _lit(st.BOT), " + (message['content'] if message['content'] is string else '') -}}",
        "{%- for call in (message['tool_calls'] or []) -%}",
        "{%- set fn = call['function'] if call['function'] is mapping else call -%}",
        "{%- if not loop.first -%}{{- ", nl, " -}}{%- endif -%}",
        "{{- ", _lit(st.TOOL_CALL_OPEN + '\n{"name": "'), " + fn['name'] + ", _lit('", "arguments": '), " -}}",
        "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}",
        "{%- elif fn['arguments'] is defined -%}{{- fn['arguments'] | tojson -}}",
        "{%- else -%}{{- '{}' -}}{%- endif -%}",
        "{{- ", _lit("}\n" + st.TOOL_CALL_CLOSE), " -}}",
        "{%- endfor -%}",
        "{{- ", _lit(st.END + "\n"), " -}}",
        "{%- elif message['role'] == 'tool' -%}",
        "{%- if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'tool' -%}{{- ", nl, " -}}",
        "{%- else -%}{{- ", _lit(st.USER), " -}}{%- endif -%}",
        "{{- ", _lit(st.TOOL_RESPONSE_OPEN + "\n"), " + message['content'] + ",
        _lit("\n" + st.TOOL_RESPONSE_CLOSE), " -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- ", _lit(st.BOT), " -}}{%- endif -%}",
    ])


__all__ = ["ARCHITECTURE", "CONFIG_AUTO_MAP", "TOKENIZER_AUTO_MAP", "CONFIG_MODULE", "CONFIG_CLASS",
           "TOKENIZER_MODULE", "TOKENIZER_CLASS", "CONFIG_CODE_FILE", "TOKENIZER_CODE_FILE", "write_config_code",
           "write_tokenizer_code", "tokenizer_config", "special_tokens_map", "chat_template"]
