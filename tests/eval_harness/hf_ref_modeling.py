"""Test-only HF modeling module for `lm_eval --model hf` on a `convert ms2hf` export: the released-math torch
reference (telechat_ms.reference.torch_model) behind AutoModelForCausalLM (the export ships no modeling code of its
own; the release's modeling file is not ours to ship). Copied into the export directory by the test."""
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_telechat2 import Telechat2Config


class TelechatRefForCausalLM(PreTrainedModel):
    config_class = Telechat2Config
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        from telechat_ms.reference.torch_model import RefConfig, TeleChatRef
        ref = TeleChatRef(RefConfig.from_hf_dict(config.to_dict()))
        self.transformer, self.lm_head = ref.transformer, ref.lm_head
        self._ref = [ref]          # the same modules; a list keeps them from being registered twice

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self._ref[0](input_ids).logits.float())
