"""The training loop: one readable function from a JobConfig to checkpoints, metrics and a final model.

    telechat-ms train --config yaml_configs/tiny/finetune_tiny_cpu.yaml [--key.path=value ...]
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from telechat_ms.errors import CheckpointError, ConfigError, DataError, TrainingError
from telechat_ms.job_config import JobConfig, OptimizerConfig
from telechat_ms.positions import BATCHED, SHARED, VARLEN, training_inputs
from telechat_ms.train.checkpoint import _fault, latest_checkpoint, load_checkpoint, save_checkpoint
from telechat_ms.train.evaluate import TrainingEval
from telechat_ms.train.lr import lr_at
from telechat_ms.train.metrics import MetricsLogger


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    final_dir: str = ""
    checkpoint: str = ""
    eval_losses: dict[int, float] = field(default_factory=dict)   # do_eval: step -> held-out loss
    best_dir: str = ""                                              # do_eval: checkpoints/best/ (lowest eval loss)


def preflight(job: JobConfig) -> None:
    """Report missing paths and a job that is not a training job before any compilation starts."""
    if job.run_mode == "predict":
        raise ConfigError(f"{job.source}: run_mode is predict: run it with `telechat-ms generate --config` or "
                          "`telechat-ms serve --config`, not train")
    if job.train_dataset is None:
        raise ConfigError(f"{job.source}: missing required section 'train_dataset' (with data_dir)")
    if not os.path.isdir(job.train_dataset.data_dir):
        raise DataError(f"{job.source}: train_dataset.data_dir {job.train_dataset.data_dir!r} does not exist")
    if job.do_eval and not os.path.isdir(job.eval_dataset.data_dir):
        raise DataError(f"{job.source}: eval_dataset.data_dir {job.eval_dataset.data_dir!r} does not exist")
    if job.load_checkpoint and not os.path.exists(job.load_checkpoint):
        raise CheckpointError(f"{job.source}: load_checkpoint {job.load_checkpoint!r} does not exist")
    if job.resume not in ("", "auto") and not os.path.isdir(job.resume):
        raise CheckpointError(f"{job.source}: resume {job.resume!r} does not exist")


def build_model(job: JobConfig):
    """The model of the job, from load_checkpoint (HF or MindSpore) or freshly initialised from the seed."""
    import mindspore as ms
    from telechat_ms.model.telechat import TeleChatForCausalLM
    ms.set_seed(job.seed)
    if job.load_checkpoint:
        from telechat_ms.config import TeleChatConfig
        cfg = job.model_config(base=TeleChatConfig.from_pretrained(job.load_checkpoint))
        model = TeleChatForCausalLM.from_pretrained(job.load_checkpoint, config=cfg)
    else:
        model = TeleChatForCausalLM(job.model_config())
    trainable = [p for p in model.get_parameters() if p.requires_grad]  # not an MoE layer's router statistics
    if job.model.lora is not None:
        from telechat_ms.model.lora import apply_lora
        lora = job.model.lora
        trainable = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    return model, trainable


def build_optimizer(opt: OptimizerConfig, learning_rate: float, params: list):
    """optimizer.type AdamW: torch's AdamW (bias correction, decoupled decay) on MindSpore's fused kernels
    (telechat_ms.train.optim); norms and biases (optimizer.no_decay_keywords) are not decayed."""
    from telechat_ms.train.optim import FusedAdamW
    optimizers = {"AdamW": FusedAdamW}
    decay = [p for p in params if not any(k in p.name for k in opt.no_decay_keywords)]
    no_decay = [p for p in params if any(k in p.name for k in opt.no_decay_keywords)]
    groups = [g for g in ({"params": decay, "weight_decay": opt.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    groups.append({"order_params": params})  # keep the gradients' order (MindSpore regroups otherwise)
    return optimizers[opt.type](groups, learning_rate=learning_rate, betas=tuple(float(b) for b in opt.betas),
                                eps=float(opt.eps), weight_decay=float(opt.weight_decay))


class PositionCache:
    """Rotary tables and masks of the training batches (telechat_ms.positions), as Tensors, in one fixed layout.

    SHARED (data without position_ids): one causal [S, d] table set, built once per length. BATCHED: per-row
    tables and masks; packed rows (position_ids) need it, and a semi-auto job declares the layout it feeds
    (`parallelize(..., batched_inputs=...)`). VARLEN (packed rows under flash attention): per-row tables and the
    samples' boundaries (actual_seq_len, `max_segments` per row) instead of [S, S] masks.
    """

    def __init__(self, cfg, layout: str = SHARED, max_segments: int | None = None):
        self.cfg, self.layout, self.max_segments = cfg, layout, max_segments
        self.cache: dict[tuple, tuple] = {}

    def __call__(self, batch: dict[str, np.ndarray]):
        import mindspore as ms
        rows, seq = batch["input_ids"].shape
        pos = batch.get("position_ids")
        if pos is None and (seq, rows) in self.cache:
            return self.cache[(seq, rows)]
        out = tuple(ms.Tensor(x) for x in training_inputs(self.cfg, seq, rows, pos, self.layout, self.max_segments))
        if pos is None:
            self.cache[(seq, rows)] = out
        return out


def input_layout(has_position_ids: bool, flash_attention: bool = False, sharded: bool = False) -> str:
    """The layout the trainer feeds for a dataset: shared causal inputs for one sample per row; for packed rows
    per-row inputs with explicit per-sample masks, or (flash attention, not sharded) the samples' boundaries for the
    kernel's TND layout. Semi-auto runs keep the explicit masks, whose batch axis the strategies split."""
    if not has_position_ids:
        return SHARED
    return VARLEN if flash_attention and not sharded else BATCHED


def train(job: JobConfig) -> TrainResult:
    """Run the job: returns the losses of the steps this process ran."""
    preflight(job)
    import mindspore as ms
    from mindspore import Tensor
    from telechat_ms.runtime_env import use_log_dir
    from telechat_ms.parallel.context import setup_context
    from telechat_ms.train.loader import BatchLoader
    from telechat_ms.train.runner import AccumulatingRunner, SemiAutoRunner

    use_log_dir(job.output_dir)   # before anything imports MindFormers
    run = setup_context(job.context, job.parallel, job.parallel_config, job.source, job.output_dir)
    runner = job.runner_config
    sharded = run.parallel_mode in ("semi_auto_parallel", "auto_parallel")
    # full_batch (sharded): every rank reads the whole global batch (micro batch x dp) and the graph splits it
    batch, rank, world = ((runner.batch_size * job.parallel_config.data_parallel, 0, 1) if sharded else
                          (runner.batch_size, run.rank, run.world_size))
    loader = BatchLoader(job.train_dataset.data_dir, batch, runner.gradient_accumulation_steps, rank=rank,
                         world_size=world, seed=job.seed, shuffle=job.train_dataset.shuffle,
                         drop_remainder=job.train_dataset.drop_remainder)
    if runner.seq_length and runner.seq_length != loader.seq_length:
        raise ConfigError(f"{job.source}: 'runner_config.seq_length' is {runner.seq_length} but the rows of "
                          f"{job.train_dataset.data_dir} hold {loader.seq_length} tokens (set 0 to use the data's)")
    total_steps = runner.max_steps if runner.max_steps > 0 else loader.batches_per_epoch * runner.epochs
    model, trainable = build_model(job)
    model.set_train(True)  # training mode in the step graphs: LoRA's dropout is active (the eval forward turns it off)
    optimizer = build_optimizer(job.optimizer, job.lr_schedule.learning_rate, trainable)
    layout = input_layout("position_ids" in loader.column_names, model.config.use_flash_attention, sharded)
    jit_config = run.jit_config() if run.device_target != "CPU" else None
    if sharded:
        stepper = SemiAutoRunner(model, optimizer, job.parallel_config, job.recompute_config, job.parallel,
                                 job.model, job.runner_wrapper, loader.seq_length, layout == BATCHED, jit_config,
                                 job.source)
    else:
        stepper = AccumulatingRunner(model, trainable, optimizer, run.world_size, job.runner_wrapper, jit_config,
                                     accumulation=runner.gradient_accumulation_steps)
    positions = PositionCache(model.config, layout, loader.max_segments)
    router_stats = None
    if model.config.is_moe and not sharded:
        from telechat_ms.train.router_stats import RouterStats
        router_stats = RouterStats(model)
        stepper.after_micro = router_stats.collect
    evaluation = TrainingEval(job, model, loader.batches_per_epoch, run.rank, run.world_size,
                              os.path.join(job.output_dir, "checkpoints"),
                              lambda directory: _save_model(job, model, loader, directory),
                              run.is_main) if job.do_eval else None

    out_dir = job.output_dir
    # Replicated weights (stand_alone, data_parallel): rank 0 writes one checkpoint. Sharded weights
    # (semi_auto_parallel on Ascend): every rank writes its own slices under rank_<r>/, next to the strategy file
    # MindSpore saves, the layout MindSpore's distributed checkpoint tools read.
    ckpt_root = os.path.join(out_dir, "checkpoints", f"rank_{run.rank}") if sharded else \
        os.path.join(out_dir, "checkpoints")
    model_params = {p.name: p for p in (trainable if job.model.lora is not None else model.get_parameters())}
    opt_params = {p.name: p for p in (*optimizer.exp_avg, *optimizer.exp_avg_sq)}
    opt_params["global_step"] = optimizer.global_step
    wrapper = job.runner_wrapper
    start = 0
    resume = latest_checkpoint(ckpt_root) if job.resume == "auto" else (job.resume or None)
    if resume:
        state = load_checkpoint(resume, model_params, opt_params)
        start = int(state["step"])
        loader.load_state_dict(state["loader"])
        if "loss_scale" in state:  # the dynamic loss scale lives in the step graph
            stepper.set_loss_scale_state(float(state["loss_scale"]), int(state.get("good_steps", 0)))
        if evaluation is not None:
            evaluation.load_state_dict(state.get("eval"))
        if state.get("rng") is not None:
            ms.set_rng_state(Tensor(np.array(state["rng"], dtype=np.uint8)))
    # the moments are stored at a power of two near the step's gradient factor (see optim.FusedAdamW.adopt)
    from telechat_ms.train.step import expected_gradient_factor
    moment_scale = expected_gradient_factor(wrapper, loader.global_batch * loader.seq_length)
    if resume and hasattr(optimizer, "adopt"):
        optimizer.adopt(moment_scale)
    logger = MetricsLogger(out_dir, total_steps, enabled=run.is_main, log_interval=job.callbacks.log_interval,
                           tensorboard=job.callbacks.tensorboard)
    if run.is_main:
        os.makedirs(out_dir, exist_ok=True)
        n_trainable = sum(int(np.prod(p.shape)) for p in trainable)
        logger.info(f"model {model.config.num_parameters() / 1e6:.2f}M params ({n_trainable / 1e6:.3f}M trainable), "
                    f"{loader.num_records} sequences of {loader.seq_length}, global batch {loader.global_batch}, "
                    f"{total_steps} steps" + (f", resuming from {resume} at step {start}" if resume else ""))
    result = TrainResult(steps=total_steps)
    last_ckpt = resume or ""

    def finish(step: int, lr: float, tokens: int, pending, seconds: float, extra: dict | None = None) -> None:
        """Read a launched step's loss and norm (after the next step was launched), log it or stop on non-finite;
        a do_eval point is evaluated here, before the next step is launched (the trainer reads its step at once)."""
        outcome = pending.outcome()
        loss, norm = outcome.loss, outcome.grad_norm
        if not outcome.finite:
            if wrapper.loss_scale == "dynamic":  # fp16 overflow: the graph skipped the update, lowered the scale
                logger.info(f"step {step + 1}: overflow, loss scale lowered to {outcome.loss_scale:g}")
                return
            raise TrainingError(f"step {step + 1}: loss or gradient is not finite (loss {loss}, grad norm {norm}); "
                                f"training stopped. "
                                f"The last good checkpoint is {last_ckpt or 'none (no checkpoint saved yet)'}")
        result.losses.append(loss)
        evaluated = evaluation(step + 1) if evaluation is not None and evaluation.due(step + 1) else None
        logger.step(step + 1, loss=loss, lr=lr, grad_norm=norm, tokens=loader.global_batch * loader.seq_length,
                    supervised=tokens, seconds=seconds, extra=extra, evaluation=evaluated)
        if evaluated is not None:
            result.eval_losses[step + 1] = evaluated["eval_loss"]

    pending = None  # (step, lr, tokens, start time, PendingStep) of the step launched last, not yet read
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        micro, tokens = loader.next_global_batch()
        lr = lr_at(step, job.lr_schedule, total_steps)
        optimizer.learning_rate.set_data(Tensor(np.float32(lr)))  # what MindFormers' cells read (semi-auto)
        launched = stepper.run(micro, tokens, positions, lr)
        stats = router_stats.pop() if router_stats is not None else None   # this step's (collected in run)
        if pending is not None:  # one step late: the device already has the next step
            finish(*pending[:3], pending[4], t0 - pending[3], pending[5])
        pending = (step, lr, tokens, t0, launched, stats)
        done = step + 1 == total_steps
        interval = job.callbacks.save_interval
        save_point = done or (interval > 0 and (step + 1) % interval == 0)
        saving = (run.is_main or sharded) and save_point
        evaluating = evaluation is not None and evaluation.due(step + 1)
        if saving or done or evaluating or _fault("kill_after_step", step + 1):
            finish(*pending[:3], pending[4], time.perf_counter() - t0, pending[5])
            pending = None
        if save_point and hasattr(optimizer, "normalize_state"):
            optimizer.normalize_state()  # every rank, so replicas stay identical: the saved m, v are torch's
        if saving:
            loss_scale, good_steps = stepper.loss_scale_state()
            state = {"loader": loader.state_dict(), "loss_scale": loss_scale, "good_steps": good_steps, "lr": lr,
                     "world_size": run.world_size,
                     "rng": ms.get_rng_state().asnumpy().tolist()}
            if evaluation is not None:
                state["eval"] = evaluation.state_dict()
            last_ckpt = save_checkpoint(ckpt_root, step + 1, model_params, opt_params, state,
                                        keep=job.callbacks.keep_checkpoint_max)
        if save_point and hasattr(optimizer, "adopt"):
            optimizer.adopt(moment_scale)  # the same state a resumed run starts from
        if _fault("kill_after_step", step + 1):
            os._exit(137)  # simulated kill -9, for the resume tests
    result.checkpoint = last_ckpt
    if evaluation is not None and evaluation.best_loss is not None:
        result.best_dir = evaluation.best_dir
    if run.is_main and not sharded:  # sharded runs end with per-rank checkpoints + the strategy file
        result.final_dir = _save_model(job, model, loader, os.path.join(job.output_dir, "final"))
    logger.close(loss_curve=job.callbacks.loss_curve)
    return result


def _save_model(job: JobConfig, model, loader, final: str) -> str:
    """The model directory convert / from_pretrained / chat accept (adapter only for LoRA runs), with the
    tokenizer the data was made with: output_dir/final at the end, checkpoints/best/ for do_eval."""
    from telechat_ms.weights import copy_tokenizer_files
    if job.model.lora is not None:
        from telechat_ms.model.lora import save_adapter
        save_adapter(model, final, base_model=job.load_checkpoint)
    else:
        model.save_pretrained(final)
    tokenizer = loader.manifest.get("tokenizer", {})
    tok_path = tokenizer.get("path") if isinstance(tokenizer, dict) else None
    if tok_path and os.path.isfile(tok_path):
        copy_tokenizer_files(os.path.dirname(tok_path), final)
    return final
