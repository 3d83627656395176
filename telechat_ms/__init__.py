"""telechat_ms: a MindSpore-first framework for the TeleChat2 family of language models.

    from telechat_ms import TeleChatConfig, TeleChatForCausalLM, TeleChatTokenizer

The model and tokenizer are imported on first use (MindSpore + MindFormers take ~10 s to import). MindSpore's own
C++ log defaults to errors only (GLOG_v=3; set GLOG_v=2 for its warnings).
"""
from telechat_ms.runtime_env import set_defaults

set_defaults()

from telechat_ms.config import TeleChatConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TeleChatConfig", "TeleChatForCausalLM", "TeleChatTokenizer", "__version__"]


def __getattr__(name: str):
    if name == "TeleChatForCausalLM":
        from telechat_ms.model.telechat import TeleChatForCausalLM
        return TeleChatForCausalLM
    if name == "TeleChatTokenizer":
        from telechat_ms.data.tokenizer import TeleChatTokenizer
        return TeleChatTokenizer
    raise AttributeError(f"module 'telechat_ms' has no attribute {name!r}")
