"""The TeleChat2 model in MindSpore (plain math; sharding is applied from telechat_ms.parallel)."""
__all__ = ["TeleChatForCausalLM", "TeleChatModel"]


def __getattr__(name: str):
    # MindSpore/MindFormers import in ~10 s: only pay for it when the model is actually used.
    if name in ("TeleChatForCausalLM", "TeleChatModel"):
        from telechat_ms.model import telechat
        return getattr(telechat, name)
    raise AttributeError(name)
