"""The TeleChat2 model in MindSpore (plain math; sharding is applied from telechat_ms.parallel)."""
from telechat_ms.model.rope import ntk_params, rope_tables

__all__ = ["ntk_params", "rope_tables", "TeleChatForCausalLM", "TeleChatModel"]


def __getattr__(name: str):
    # MindSpore/MindFormers import in ~10 s: only pay for it when the model is actually used.
    if name in ("TeleChatForCausalLM", "TeleChatModel"):
        from telechat_ms.model import telechat
        return getattr(telechat, name)
    raise AttributeError(name)
