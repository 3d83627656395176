"""Putting a server together: load the model and tokenizer once, start the engine over a local CacheStepper, build
the app, run it under uvicorn (in the foreground for `telechat-ms serve`, or in a thread for tests and benchmarks).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
from dataclasses import dataclass

import numpy as np

from telechat_ms.errors import ConfigError
from telechat_ms.infer.gen_config import GenerationConfig
from telechat_ms.serve.engine import Engine, Scorer, StepperFactory
from telechat_ms.serve.state import ServeState

log = logging.getLogger("telechat_ms.serve")


@dataclass
class ServeConfig:
    """`telechat-ms serve` options."""

    model_dir: str
    tokenizer: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    max_model_len: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    use_jit: bool = True
    warmup: bool = True
    device_target: str | None = None


def local_stepper_factory(model, use_jit: bool = True) -> StepperFactory:
    """Engine stepper factory over this process's model (telechat_ms.infer.kv_cache.CacheStepper)."""
    from telechat_ms.infer.kv_cache import CacheStepper

    def make(batch: int, max_len: int) -> CacheStepper:
        return CacheStepper(model, batch, max_len, use_jit)
    return make


def full_forward_scorer(model) -> Scorer:
    """Prompt logits [S, V] from the model's full forward (the scoring path of spec section 1)."""
    import mindspore as ms

    def score(ids: list[int]) -> np.ndarray:
        return model(ms.Tensor(np.asarray([ids], np.int32))).asnumpy()[0]
    return score


def build_state(cfg: ServeConfig) -> ServeState:
    """Load model + tokenizer, start the engine (compiling its graphs when warmup is on)."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    from telechat_ms.model.telechat import TeleChatForCausalLM
    if cfg.device_target:
        import mindspore as ms
        ms.set_device(cfg.device_target)
    for name, value, low in (("--max-batch-size", cfg.max_batch_size, 1), ("--max-queue", cfg.max_queue, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    tokenizer = TeleChatTokenizer.from_pretrained(cfg.tokenizer or cfg.model_dir)
    model = TeleChatForCausalLM.from_pretrained(cfg.model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{tokenizer.model_file}: {tokenizer.vocab_size} pieces, but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    max_model_len = cfg.max_model_len or model.config.seq_length
    if max_model_len < 2:
        raise ConfigError(f"--max-model-len must be >= 2, got {max_model_len}")
    engine = Engine(local_stepper_factory(model, cfg.use_jit), tokenizer, tokenizer.vocab_size, max_model_len,
                    max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, scorer=full_forward_scorer(model),
                    pad_token_id=model.config.pad_token_id, warmup=cfg.warmup)
    engine.start()
    return ServeState(engine, tokenizer, cfg.served_model_name or cfg.model_dir,
                      GenerationConfig.from_pretrained(cfg.model_dir), cfg.model_dir, cfg.api_key)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn serving an app in a background thread on an already bound socket (port 0: any free port)."""

    def __init__(self, state: ServeState, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 static_dir: str | None = None):
        import uvicorn
        from telechat_ms.serve.app import create_app
        self.state = state
        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(state, static_dir), log_level=log_level,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       name="telechat-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started:
                return self
            self.thread.join(0.05)
        raise RuntimeError("the HTTP server did not start")

    def stop(self, shutdown_engine: bool = True) -> None:
        """Stop HTTP, then (unless told not to: another server shares it) the engine."""
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        if shutdown_engine:
            self.state.engine.shutdown()


def run(cfg: ServeConfig) -> int:
    """`telechat-ms serve`: serve until interrupted."""
    import uvicorn
    from telechat_ms.serve.app import create_app
    sock = _bind(cfg.host, cfg.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"telechat-ms serve: loading {cfg.model_dir} ...", file=sys.stderr, flush=True)
    state = build_state(cfg)
    e = state.engine
    print(f"telechat-ms serve: {state.model_name!r} on http://{cfg.host}:{sock.getsockname()[1]} "
          f"(batch {e.batch} rows x {e.max_model_len} tokens, queue {e.max_queue}"
          f"{', API key required' if cfg.api_key else ''})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="info", lifespan="off"))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        e.shutdown()
        sock.close()
    return 0
