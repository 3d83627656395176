"""Loading a model for evaluation: a TeleChat2 directory (HF or MindSpore safetensors + tokenizer.model) in this
process, with the batched scorer over its full forward and a serving engine over its kv-cache stepper."""
from __future__ import annotations

from telechat_ms.config import TeleChatConfig
from telechat_ms.errors import ConfigError
from telechat_ms.eval.prefix import LocalPrefixForward
from telechat_ms.eval.runner import EvalModel
from telechat_ms.eval.scoring import LoglikelihoodScorer, local_forward, stepper_forward

RELEASED_SIZES = ("3b", "7b", "35b", "115b")


def released_size(cfg: TeleChatConfig) -> str | None:
    """The released size whose shape `cfg` has (its published scores go beside ours), else None."""
    for name in RELEASED_SIZES:
        p = TeleChatConfig.preset(name)
        if (p.hidden_size, p.n_layer, p.n_head) == (cfg.hidden_size, cfg.n_layer, cfg.n_head):
            return name
    return None


def engine_for(model, tokenizer, max_model_len: int, batch_size: int, use_jit: bool):
    """A started serving engine over this process's model (the same construction `telechat-ms serve` uses)."""
    from telechat_ms.serve.engine import Engine
    from telechat_ms.serve.server import local_stepper_factory
    engine = Engine(local_stepper_factory(model, use_jit), tokenizer, tokenizer.vocab_size, max_model_len,
                    max_batch_size=batch_size, max_queue=max(64, 4 * batch_size),
                    pad_token_id=model.config.pad_token_id, warmup=use_jit)
    return engine.start()


def eval_model(model, tokenizer, name: str, batch_size: int = 8, max_model_len: int | None = None,
               use_jit: bool = False, size: str | None = None, share_context: bool = True) -> EvalModel:
    """EvalModel over a loaded TeleChatForCausalLM and its tokenizer."""
    from telechat_ms.infer.gen_config import GenerationConfig
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    max_len = int(max_model_len or model.config.seq_length)
    gen = GenerationConfig.from_pretrained(getattr(model, "name_or_path", None))
    scorer = LoglikelihoodScorer(local_forward(model), max_len, batch_size, share_context=share_context,
                                 pad_id=model.config.pad_token_id,
                                 prefix=LocalPrefixForward(model) if share_context else None)
    return EvalModel(name, tokenizer, scorer, lambda: engine_for(model, tokenizer, max_len, batch_size, use_jit),
                     tuple(sorted(gen.stop_ids)), model=model, size=size or released_size(model.config))


def load_eval_model(model_dir: str, tokenizer: str | None = None, batch_size: int = 8,
                    max_model_len: int | None = None, use_jit: bool = False, size: str | None = None) -> EvalModel:
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    model = TeleChatForCausalLM.from_pretrained(model_dir)
    tok = TeleChatTokenizer.for_model(tokenizer or model_dir, model.config.vocab_size)
    return eval_model(model, tok, model_dir, batch_size, max_model_len, use_jit, size)


def stepper_eval_model(model, tokenizer, name: str, stepper, on_idle=None, size: str | None = None) -> EvalModel:
    """EvalModel over a kv-cache stepper built beforehand: the model-parallel leader of a predict job (its build
    compiles no full forward), scoring and generating through its steps; rows x slots are the job's kv cache."""
    from telechat_ms.infer.gen_config import GenerationConfig
    from telechat_ms.serve.engine import Engine
    from telechat_ms.serve.server import fixed_stepper_factory
    gen = GenerationConfig.from_pretrained(getattr(model, "name_or_path", None))
    scorer = LoglikelihoodScorer(stepper_forward(stepper, model.config.pad_token_id), stepper.max_len - 1,
                                 stepper.batch, pad_id=model.config.pad_token_id)

    def make_engine():
        return Engine(fixed_stepper_factory(stepper), tokenizer, tokenizer.vocab_size, stepper.max_len - 1,
                      max_batch_size=stepper.batch, max_queue=max(64, 4 * stepper.batch),
                      pad_token_id=model.config.pad_token_id, warmup=False, on_idle=on_idle).start()
    return EvalModel(name, tokenizer, scorer, make_engine, tuple(sorted(gen.stop_ids)), model=model,
                     size=size or released_size(model.config))
