"""Putting a server together: load the model and tokenizer once, start the engine over a local paged stepper, build
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
from telechat_ms.serve.paged_engine import DEFAULT_DECODE_SLOWDOWN, PagedEngine
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
    cpu_threads: int | None = None      # CPU kernel threads (MindSpore's default: 25)
    batch_window_ms: float = 0.0        # an idle engine waits this long for more requests to prefill together
    # the paged kv cache (serve MODEL_DIR): block size, and its size as a block count or a memory budget
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int = 512   # tokens one step computes at most (decodes + prefill chunks)
    prefix_caching: bool = True
    max_decode_slowdown: float = DEFAULT_DECODE_SLOWDOWN   # prompt chunks beside decodes: what they can afford
    compile_cache: str | None = None    # infer.compile_cache root (the CLI's default: ~/.cache/...); None: off


def local_stepper_factory(model, use_jit: bool = True) -> StepperFactory:
    """Engine stepper factory over this process's model (telechat_ms.infer.kv_cache.CacheStepper)."""
    from telechat_ms.infer.kv_cache import CacheStepper

    def make(batch: int, max_len: int) -> CacheStepper:
        return CacheStepper(model, batch, max_len, use_jit)
    return make


def paged_stepper_factory(model, use_jit: bool = True, jit_config=None, compile_cache: str | None = None):
    """PagedEngine stepper factory over this process's model (telechat_ms.infer.paged.PagedStepper); jit_config: a
    predict job's (its context.jit_level); compile_cache: the root of the graphs kept on disk (infer.compile_cache)."""
    from telechat_ms.infer.paged import PagedStepper

    def make(num_blocks: int, block_size: int) -> PagedStepper:
        stepper = PagedStepper(model, num_blocks, block_size, use_jit, compile_cache=compile_cache)
        if jit_config is not None:
            stepper.cell.set_jit_config(jit_config)
        return stepper
    return make


def full_forward_scorer(model) -> Scorer:
    """Prompt logits [S, V] from the model's full forward (the scoring path of spec section 1)."""
    import mindspore as ms

    def score(ids: list[int]) -> np.ndarray:
        return model(ms.Tensor(np.asarray([ids], np.int32))).asnumpy()[0]
    return score


def set_runtime(device_target: str | None, cpu_threads: int | None) -> None:
    """MindSpore device and CPU kernel thread count, before any kernel runs. On a small CPU box the server's event
    loop (and local clients) need a core too: fewer kernel threads than cores avoids oversubscription."""
    import mindspore as ms
    if device_target:
        ms.set_device(device_target)
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ConfigError(f"--cpu-threads must be >= 1, got {cpu_threads}")
        ms.device_context.cpu.op_tuning.threads_num(cpu_threads)


def start_state(cfg: ServeConfig, model, checkpoint: str, factory: StepperFactory, max_model_len: int,
                max_batch_size: int, scorer: Scorer | None, on_idle=None, paged: dict | None = None,
                engine_scorer: bool = False) -> ServeState:
    """The tokenizer (checked against the model), the engine over `factory` (started: compiling its graphs when
    warmup is on) and the served state, for a model loaded from `checkpoint`. `paged`: the PagedEngine's cache
    and budget settings (factory then makes PagedSteppers); None: the static-cache Engine. engine_scorer: prompt
    log-probs through the paged engine's stepper (serve.paged_score), where no full forward is compiled."""
    from telechat_ms.data.tokenizer import TeleChatTokenizer
    tokenizer = TeleChatTokenizer.for_model(cfg.tokenizer or checkpoint, model.config.vocab_size)
    cls, extra = (Engine, {}) if paged is None else (PagedEngine, paged)
    engine = cls(factory, tokenizer, tokenizer.vocab_size, max_model_len, max_batch_size=max_batch_size,
                 max_queue=cfg.max_queue, scorer=scorer, pad_token_id=model.config.pad_token_id,
                 warmup=cfg.warmup, batch_window=cfg.batch_window_ms / 1000.0, on_idle=on_idle, **extra)
    if engine_scorer:
        from telechat_ms.serve.paged_score import PagedScorer
        engine.scorer = PagedScorer(engine)
    engine.start()
    return ServeState(engine, tokenizer, cfg.served_model_name or checkpoint,
                      GenerationConfig.from_pretrained(checkpoint), checkpoint, cfg.api_key)


def build_state(cfg: ServeConfig) -> ServeState:
    """Load model + tokenizer from cfg.model_dir, start the engine over a local CacheStepper."""
    from telechat_ms.model.telechat import TeleChatForCausalLM
    set_runtime(cfg.device_target, cfg.cpu_threads)
    for name, value, low in (("--max-batch-size", cfg.max_batch_size, 1), ("--max-queue", cfg.max_queue, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    model = TeleChatForCausalLM.from_pretrained(cfg.model_dir)
    max_model_len = cfg.max_model_len or model.config.seq_length
    if max_model_len < 2:
        raise ConfigError(f"--max-model-len must be >= 2, got {max_model_len}")
    factory = paged_stepper_factory(model, cfg.use_jit, compile_cache=cfg.compile_cache)
    return start_state(cfg, model, cfg.model_dir, factory, max_model_len, cfg.max_batch_size,
                       full_forward_scorer(model), paged=paged_settings(cfg, model.config, max_model_len))


def paged_settings(cfg: ServeConfig, model_config, max_model_len: int, mp: int = 1) -> dict:
    """The PagedEngine's keyword arguments from the serve options (the cache's block count from --num-blocks or
    --kv-cache-memory-bytes, telechat_ms.infer.paged.plan_num_blocks; mp > 1: the budget is per device, each
    holding 1/mp of every block's kv heads)."""
    from telechat_ms.infer.paged import plan_num_blocks
    for name, value in (("--block-size", cfg.block_size), ("--max-num-batched-tokens", cfg.max_num_batched_tokens),
                        ("--num-blocks", cfg.num_blocks), ("--kv-cache-memory-bytes", cfg.kv_cache_memory_bytes)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    num_blocks = plan_num_blocks(model_config, max_model_len, cfg.max_batch_size, cfg.block_size, cfg.num_blocks,
                                 cfg.kv_cache_memory_bytes, mp=mp)
    return dict(num_blocks=num_blocks, block_size=cfg.block_size, max_num_batched_tokens=cfg.max_num_batched_tokens,
                prefix_caching=cfg.prefix_caching, max_decode_slowdown=cfg.max_decode_slowdown)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket. Its protocol is named (IPPROTO_TCP, not 0): asyncio turns Nagle off (TCP_NODELAY) only
    on accepted sockets whose proto says TCP, and with Nagle on a streamed token waited for the client's delayed
    ACK of the one before: measured, every keep-alive request's first tokens arrived ~40 ms late, together."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


def _quiet_exit_server(config):
    """uvicorn's Server shutting down gracefully on SIGINT / SIGTERM without re-raising the signal afterwards (it
    does, and MindSpore's runtime turns that into a kill): Ctrl-C ends `telechat-ms serve` with exit code 0, and a
    model-parallel rank 0 gets to release its followers."""
    import contextlib
    import signal
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)
    return Server(config)


def _serve_forever(state: ServeState, sock: socket.socket, cfg: ServeConfig) -> int:
    """Serve `state` on a bound socket until interrupted (SIGINT / SIGTERM), then stop the engine."""
    import uvicorn
    from telechat_ms.serve.app import create_app
    e = state.engine
    print(f"telechat-ms serve: {state.model_name!r} on http://{cfg.host}:{sock.getsockname()[1]} "
          f"(batch {e.batch} rows x {e.max_model_len} tokens, queue {e.max_queue}"
          f"{', API key required' if cfg.api_key else ''})", file=sys.stderr, flush=True)
    server = _quiet_exit_server(uvicorn.Config(create_app(state), log_level="info", lifespan="off"))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        e.shutdown()
        sock.close()
    return 0


def run(cfg: ServeConfig) -> int:
    """`telechat-ms serve MODEL_DIR`: serve until interrupted."""
    sock = _bind(cfg.host, cfg.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"telechat-ms serve: loading {cfg.model_dir} ...", file=sys.stderr, flush=True)
    return _serve_forever(build_state(cfg), sock, cfg)


def fixed_stepper_factory(stepper) -> StepperFactory:
    """An engine factory handing out one stepper built beforehand (a predict job's kv cache): the engine must ask
    for exactly its rows and slots."""
    def make(batch: int, cache_len: int):
        if (batch, cache_len) != (stepper.batch, stepper.max_len):
            raise ConfigError(f"the engine asked for {batch} rows x {cache_len} slots; the job's kv cache is "
                              f"{stepper.batch} x {stepper.max_len} (runner_config.batch_size x seq_length)")
        return stepper
    return make


def run_job(job, cfg: ServeConfig) -> int:
    """`telechat-ms serve --config PREDICT.yaml`: the PagedEngine over runner_config.batch_size rows of seq_length
    tokens (the paged-cache flags size its cache; on mp NPUs --kv-cache-memory-bytes is per NPU), in one process,
    or model parallel under msrun, where rank 0 owns the HTTP port and its engine drives every rank in lockstep
    (the others replay its paged calls; while idle it keeps them alive). Under model parallel the full forward is
    not compiled: prompt log-probs (echo + logprobs) go through the paged step (serve.paged_score)."""
    import dataclasses
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if job.parallel.parallel_mode == "data_parallel":
        raise ConfigError(f"{job.source}: parallel.parallel_mode data_parallel: serve one replica per device "
                          "(one stand_alone serve each, behind a load balancer); one server cannot own several")
    cfg = dataclasses.replace(cfg, max_batch_size=job.batch_size)
    max_model_len = job.model_config.seq_length
    mp = job.parallel_config.model_parallel if job.model_parallel else 1
    paged = paged_settings(cfg, job.model_config, max_model_len, mp=mp)
    if job.model_parallel:
        from telechat_ms.parallel.paged_predict import build_model_parallel_paged
        from telechat_ms.parallel.predict import run_lockstep
        session = build_model_parallel_paged(job, paged["num_blocks"], paged["block_size"], use_jit=cfg.use_jit)

        def work(model, leader) -> int:
            sock = _bind(cfg.host, cfg.port)
            state = start_state(cfg, model, job.load_checkpoint, fixed_paged_factory(leader), max_model_len,
                                job.batch_size, None, on_idle=leader.keepalive, paged=paged, engine_scorer=True)
            return _serve_forever(state, sock, cfg)
        result = run_lockstep(session, work, paged=True)
        return 0 if result is None else result
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.parallel.context import setup_context
    sock = _bind(cfg.host, cfg.port)
    run_ctx = setup_context(job.context, job.parallel, job.parallel_config, job.source, job.output_dir)
    set_runtime(None, cfg.cpu_threads)
    print(f"telechat-ms serve: loading {job.load_checkpoint} ({job.source}) ...", file=sys.stderr, flush=True)
    model = TeleChatForCausalLM.from_pretrained(job.load_checkpoint, config=job.model_config)
    state = start_state(cfg, model, job.load_checkpoint, paged_stepper_factory(model, cfg.use_jit,
                                                                               run_ctx.jit_config(),
                                                                               cfg.compile_cache),
                        max_model_len, job.batch_size, full_forward_scorer(model), paged=paged)
    return _serve_forever(state, sock, cfg)


def fixed_paged_factory(stepper):
    """A PagedEngine factory handing out one paged stepper built beforehand (a model-parallel job's, whose cache
    was laid out before the weights were loaded): the engine must ask for exactly its blocks."""
    def make(num_blocks: int, block_size: int):
        if (num_blocks, block_size) != (stepper.num_blocks, stepper.block_size):
            raise ConfigError(f"the engine asked for {num_blocks} blocks of {block_size}; the job's paged kv cache "
                              f"has {stepper.num_blocks} of {stepper.block_size}")
        return stepper
    return make
