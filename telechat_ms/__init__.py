"""telechat_ms: a MindSpore-first framework for the TeleChat2 family of language models."""
from telechat_ms.config import TeleChatConfig

__version__ = "0.1.0"
__all__ = ["TeleChatConfig", "__version__"]
