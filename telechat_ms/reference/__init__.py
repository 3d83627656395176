"""Torch reference of TeleChat2 (needs the optional torch extra): checks the MindSpore model's numbers."""
from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
from telechat_ms.reference.torch_model import (
    GenerateOutput,
    RefConfig,
    RefOutput,
    TeleChatRef,
    ntk_params,
    ntk_rope,
    process_logits,
)

__all__ = ["GenerateOutput", "RefConfig", "RefOutput", "TeleChatRef", "ntk_params", "ntk_rope",
           "process_logits", "tiny_config", "write_random_hf_checkpoint"]
