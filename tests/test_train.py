"""Training: torch parity, exact resume, crash-safe checkpoints, overfitting, LoRA, YAML errors."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from telechat_ms.checkpoint_io import checkpoint_entries, safetensors_entries
from telechat_ms.errors import ConfigError, DataError
from telechat_ms.job_config import job_from_dict, load_job_config
from tests.train_helpers import losses, run_train, tiny_job, write_yaml

torch = pytest.importorskip("torch")


def _weights(path: str) -> dict[str, np.ndarray]:
    return {e.name: e.read() for e in safetensors_entries(path)}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_matches_torch_adamw(accumulation, demo_data, tmp_path, pynative_after):
    """20 optimizer steps from the same weights on the same batches: telechat_ms (one fused graph per step, or
    accumulated micro batches + the finishing graph) vs the torch reference with torch.optim.AdamW (decay on
    matrices only), the same warmup+cosine lr and global-norm clipping (active: max norm 0.5)."""
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from telechat_ms.reference.torch_model import TeleChatRef
    from telechat_ms.train.loader import BatchLoader
    from telechat_ms.train.lr import lr_at
    from telechat_ms.train.trainer import train
    from telechat_ms.weights import hf_to_ms

    hf_dir = str(tmp_path / "init")
    write_random_hf_checkpoint(hf_dir, tiny_config(vocab_size=demo_data["vocab_size"]), seed=3)
    job = job_from_dict(tiny_job(demo_data["data"], str(tmp_path / "run"), demo_data["vocab_size"],
                                 load_checkpoint=hf_dir, model={"model_config": {}},
                                 runner_config={"batch_size": 4, "max_steps": 20,
                                                "gradient_accumulation_steps": accumulation},
                                 runner_wrapper={"use_clip_grad": True, "max_grad_norm": 0.5}))
    result = train(job)

    ref = TeleChatRef.from_pretrained(hf_dir)
    named = dict(ref.named_parameters())
    no_decay = [p for n, p in named.items() if any(k in hf_to_ms(n) for k in ("norm", "bias"))]
    decay = [p for n, p in named.items() if not any(k in hf_to_ms(n) for k in ("norm", "bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    loader = BatchLoader(demo_data["data"], 4, accumulation=accumulation, seed=job.seed)
    ref_losses, clipped = [], 0
    for step in range(20):
        micro, tokens = loader.next_global_batch()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, job.lr_schedule, 20)
        opt.zero_grad()
        total = 0.0
        for batch in micro:
            ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
            labels = torch.from_numpy(batch["labels"].astype(np.int64))
            logits = ref(ids).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            (nll / tokens).backward()
            total += float(nll.detach())
        clipped += float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)) > 0.5
        opt.step()
        ref_losses.append(total / tokens)
    assert clipped >= 10  # the clipping path is exercised
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-4)
    final = _weights(os.path.join(result.final_dir, "model.safetensors"))
    for name, p in named.items():
        # Adam divides by sqrt(v): an element whose gradient is at fp32 noise level moves by ~lr either way, so
        # the two sides' summation orders (BLAS kernels differ between CPUs) may part there. Every element stays
        # within 1e-3 (half of one step at the peak lr, 2e-3), all but 1 in 10^4 within 1e-4.
        diff = np.abs(final[hf_to_ms(name)] - p.detach().numpy())
        assert diff.max() < 1e-3, (name, float(diff.max()))
        assert (diff > 1e-4).mean() <= 1e-4, (name, int((diff > 1e-4).sum()), diff.size)
    assert result.losses[-1] < result.losses[0]


def test_exact_resume_after_kill(demo_data, tmp_path):
    base = tiny_job(demo_data["data"], str(tmp_path / "full"), demo_data["vocab_size"],
                    runner_config={"batch_size": 4, "max_steps": 20},
                    callbacks={"save_interval": 10, "log_interval": 5, "keep_checkpoint_max": 3,
                               "tensorboard": False, "loss_curve": False})
    full = write_yaml(str(tmp_path / "full.yaml"), base)
    run_train(full)
    killed = write_yaml(str(tmp_path / "killed.yaml"), {**base, "output_dir": str(tmp_path / "killed")})
    proc = run_train(killed, env={"TELECHAT_MS_FAULT": "kill_after_step:10"}, check=False)
    assert proc.returncode == 137
    assert sorted(losses(str(tmp_path / "killed"))) == list(range(1, 11))
    run_train(killed, "--resume=auto")
    a, b = losses(str(tmp_path / "full")), losses(str(tmp_path / "killed"))
    for step in range(11, 21):
        assert a[step] == b[step], step  # bitwise on CPU
    wa = _weights(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = _weights(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)


def test_crash_during_checkpoint_write_keeps_previous(demo_data, tmp_path):
    job = tiny_job(demo_data["data"], str(tmp_path / "run"), demo_data["vocab_size"],
                   runner_config={"batch_size": 4, "max_steps": 12},
                   callbacks={"save_interval": 4, "log_interval": 4, "keep_checkpoint_max": 5,
                              "tensorboard": False, "loss_curve": False})
    cfg = write_yaml(str(tmp_path / "job.yaml"), job)
    proc = run_train(cfg, env={"TELECHAT_MS_FAULT": "crash_in_save:8"}, check=False)
    assert proc.returncode == 86
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step_00000004"]
    assert any(p.name.startswith(".step_00000008") for p in ckpts.iterdir())  # the torn write, not picked
    proc = run_train(cfg, "--resume=auto")
    assert "resuming from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    assert sorted(losses(str(tmp_path / "run"))) == list(range(1, 13))
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # the torn write was cleaned up


def test_overfits_sixteen_samples(demo_data, tmp_path, pynative_after):
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.train.trainer import train
    sixteen = tmp_path / "mix.json"
    src = tmp_path / "sixteen.jsonl"
    demo = os.path.join(os.path.dirname(__file__), "..", "telechat_ms", "demo_data", "sft_demo.jsonl")
    src.write_text("".join(open(demo, encoding="utf-8").readlines()[:16]), encoding="utf-8")
    sixteen.write_text('{"sixteen.jsonl": 1}')
    process_data(ProcessOptions(data_mix=str(sixteen), tokenizer=demo_data["tokenizer"], out=str(tmp_path / "d"),
                                max_seq_len=64, pack=False, progress=False))
    job = job_from_dict(tiny_job(str(tmp_path / "d"), str(tmp_path / "run"), demo_data["vocab_size"],
                                 runner_config={"batch_size": 4, "max_steps": 150},
                                 optimizer={"weight_decay": 0.0},
                                 lr_schedule={"type": "constant", "learning_rate": 3e-3, "warmup_steps": 5}))
    result = train(job)
    assert result.losses[-1] < 0.1 * result.losses[0], (result.losses[0], result.losses[-1])


def test_yaml_errors_are_named(tmp_path, demo_data):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  model_config: {preset: tiny}\nrunner_config:\n  batch_sise: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: 'runner_config.batch_sise': unknown key; "
                                          r"did you mean 'runner_config.batch_size'\?"):
        load_job_config(str(path))
    path.write_text("model:\n  model_config: {preset: tiny}\nrunner_config:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: 'runner_config.batch_size' must be an integer"):
        load_job_config(str(path))
    path.write_text("runner_config:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"missing required key 'model'"):
        load_job_config(str(path))
    job = tiny_job(str(tmp_path / "nowhere"), str(tmp_path / "run"), 1024)
    cfg = write_yaml(str(tmp_path / "job.yaml"), job)
    proc = run_train(cfg, check=False)
    assert proc.returncode == 2 and "train_dataset.data_dir" in proc.stderr and "does not exist" in proc.stderr
    assert "compil" not in proc.stdout.lower()
    proc = run_train(cfg, f"--train_dataset.data_dir={demo_data['data']}", "--load_checkpoint=/no/such/ckpt",
                     check=False)
    assert proc.returncode == 2 and "/no/such/ckpt" in proc.stderr
    assert load_job_config(cfg, ["--runner_config.batch_size=8"]).runner_config.batch_size == 8
    with pytest.raises(ConfigError, match="'model.model_config.n_layr': unknown key; did you mean"):
        job_from_dict({**job, "model": {"model_config": {"preset": "tiny", "n_layr": 3}}}).model_config()
    from telechat_ms.train.trainer import preflight
    with pytest.raises(DataError):
        preflight(job_from_dict(job))


def test_lora_trains_only_adapters_and_merges(demo_data, tmp_path, pynative_after):
    import mindspore as ms
    from telechat_ms.cli import main
    from telechat_ms.model.lora import load_adapter
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from telechat_ms.train.trainer import build_model, train
    from telechat_ms.weights import hf_to_ms

    base = str(tmp_path / "base")
    write_random_hf_checkpoint(base, tiny_config(vocab_size=demo_data["vocab_size"]), seed=5)
    job = job_from_dict(tiny_job(demo_data["data"], str(tmp_path / "run"), demo_data["vocab_size"],
                                 load_checkpoint=base, model={"model_config": {},
                                 "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["wq", "wk_v", "w2"]}},
                                 runner_config={"batch_size": 4, "max_steps": 6},
                                 lr_schedule={"type": "constant", "learning_rate": 1e-2, "warmup_steps": 0}))
    model, trainable = build_model(job)
    assert sorted(p.name.rsplit(".", 1)[-1] for p in trainable) == ["lora_a"] * 6 + ["lora_b"] * 6
    result = train(job)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    saved = {e.name for e in checkpoint_entries(result.final_dir)}
    assert saved == {p.name for p in trainable}  # adapters only
    # the base weights did not move: train() left them as loaded
    trained = TeleChatForCausalLM.from_pretrained(base)
    load_adapter(trained, result.final_dir)
    base_sd = {hf_to_ms(e.name): e.read() for e in checkpoint_entries(base)}
    for p in trained.get_parameters():
        if p.name in base_sd:
            assert np.array_equal(p.asnumpy(), base_sd[p.name]), p.name
    ids = ms.Tensor(np.arange(1, 25, dtype=np.int32).reshape(2, 12))
    with_adapter = trained(ids).asnumpy()
    plain = TeleChatForCausalLM.from_pretrained(base)(ids).asnumpy()
    assert np.abs(with_adapter - plain).max() > 1e-4  # the adapters learned something
    assert main(["lora", "merge", base, result.final_dir, str(tmp_path / "merged"), "--format", "hf"]) == 0
    merged = TeleChatForCausalLM.from_pretrained(str(tmp_path / "merged"))(ids).asnumpy()
    assert np.abs(merged - with_adapter).max() <= 1e-5
    assert main(["convert", "hf2ms", str(tmp_path / "merged"), str(tmp_path / "merged_ms"), "--quiet"]) == 0


def test_lora_dropout_is_active_in_training(demo_data, tmp_path, pynative_after):
    """The trainer runs the step graphs in training mode: LoRA's dropout changes the updates (the first loss is the
    same, lora_b starts at 0), and the held-out forward runs without it (two evaluations agree)."""
    from telechat_ms.reference.random_checkpoint import tiny_config, write_random_hf_checkpoint
    from telechat_ms.train.evaluate import heldout_loss
    from telechat_ms.train.trainer import build_model, train

    base = str(tmp_path / "base")
    write_random_hf_checkpoint(base, tiny_config(vocab_size=demo_data["vocab_size"]), seed=5)
    runs = {}
    for dropout in (0.0, 0.5):
        job = job_from_dict(tiny_job(demo_data["data"], str(tmp_path / f"run{dropout}"), demo_data["vocab_size"],
                                     load_checkpoint=base, model={"model_config": {}, "lora": {
                                         "rank": 4, "alpha": 8.0, "dropout": dropout, "target_modules": ["wq", "w2"]}},
                                     runner_config={"batch_size": 4, "max_steps": 3},
                                     lr_schedule={"type": "constant", "learning_rate": 1e-2, "warmup_steps": 0}))
        runs[dropout] = train(job).losses
    assert runs[0.0][0] == runs[0.5][0]
    assert abs(runs[0.0][2] - runs[0.5][2]) > 1e-5, runs
    model, _ = build_model(job)
    model.set_train(True)
    first, second = (heldout_loss(model, demo_data["data"], 4, max_steps=1)["loss"] for _ in range(2))
    assert first == second
    assert model.training  # the evaluation hands the model back in training mode


def test_dynamic_loss_scale_skips_overflowing_steps(demo_data, tmp_path):
    """An absurd initial loss scale overflows: those steps are skipped (no update), the scale drops, and
    training carries on with finite losses, as fp16 training on Ascend needs."""
    job = tiny_job(demo_data["data"], str(tmp_path / "run"), demo_data["vocab_size"],
                   runner_config={"batch_size": 4, "max_steps": 6},
                   runner_wrapper={"use_clip_grad": True, "max_grad_norm": 1.0, "loss_scale": "dynamic",
                                   "loss_scale_value": 3.0e38, "scale_factor": 1.0e4, "scale_window": 1000})
    proc = run_train(write_yaml(str(tmp_path / "job.yaml"), job))
    assert "overflow, loss scale lowered to 3e+34" in proc.stdout
    logged = losses(str(tmp_path / "run"))
    assert 1 not in logged and len(logged) >= 4 and all(np.isfinite(list(logged.values())))
    job["runner_wrapper"] = {"loss_scale": "none"}
    job["lr_schedule"] = {"type": "constant", "learning_rate": 1.0e30}  # step 1 blows the weights up
    proc = run_train(write_yaml(str(tmp_path / "nan.yaml"), {**job, "output_dir": str(tmp_path / "nan")}),
                     check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(r"step 2: loss or gradient is not finite \(loss [-\d.e+naif]+, grad norm (nan|inf)",
                     proc.stderr), proc.stderr[-500:]
    assert "last good checkpoint is none" in proc.stderr


def test_packed_samples_do_not_attend_across_boundaries(tiny_gqa_ckpt):
    """With position_ids from `process-data --no-cross-attention`, a packed row computes each sample exactly as
    if it stood alone: positions restart and attention is blocked at the boundary."""
    import mindspore as ms
    from telechat_ms.model.telechat import TeleChatForCausalLM
    from telechat_ms.train.trainer import PositionCache
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    rng = np.random.default_rng(0)
    a, b = rng.integers(4, 200, size=7), rng.integers(4, 200, size=9)
    packed = np.concatenate([a, b]).astype(np.int32)[None]
    pos = np.concatenate([np.arange(7), np.arange(9)]).astype(np.int32)[None]
    cos, sin, mask = PositionCache(model.config, "batched")({"input_ids": packed, "position_ids": pos})
    hidden = model.model(ms.Tensor(packed), cos, sin, mask)
    logits = model.lm_head(hidden).asnumpy()[0]
    alone_a = model(ms.Tensor(a.astype(np.int32)[None])).asnumpy()[0]
    alone_b = model(ms.Tensor(b.astype(np.int32)[None])).asnumpy()[0]
    np.testing.assert_allclose(logits[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[7:], alone_b, atol=1e-5)
    plain = model(ms.Tensor(packed)).asnumpy()[0]
    assert np.abs(plain[7:] - alone_b).max() > 1e-3  # without the boundaries the second sample sees the first


def test_loader_reads_rows_on_demand_across_shards(demo_data, tmp_path):
    """The loader's on-demand reads equal the shards' rows; ranks partition each global batch; epochs reshuffle."""
    from telechat_ms.data.mindrecord import list_shards, read_mindrecord
    from telechat_ms.data.process import ProcessOptions, process_data
    from telechat_ms.train.loader import BatchLoader
    mix = os.path.join(os.path.dirname(__file__), "..", "telechat_ms", "demo_data", "demo_mix.json")
    out = str(tmp_path / "d")
    process_data(ProcessOptions(data_mix=mix, tokenizer=demo_data["tokenizer"], out=out, max_seq_len=64,
                                records_per_shard=30, progress=False))
    assert len(list_shards(out)) > 2
    full = read_mindrecord(out)
    whole = BatchLoader(out, 4, accumulation=2, seed=3)
    ranks = [BatchLoader(out, 2, accumulation=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(whole.batches_per_epoch + 1):  # crosses into epoch 1
        micro, tokens = whole.next_global_batch()
        rows = np.concatenate([m["input_ids"] for m in micro])
        parts = [rk.next_global_batch() for rk in ranks]
        assert tokens == sum(t for _, t in parts)
        split = np.concatenate([m["input_ids"] for p, _ in parts for m in p])
        assert np.array_equal(rows, split)  # rank r holds the r-th contiguous slice of the same global batch
        for row in rows:
            assert any(np.array_equal(row, r) for r in full["input_ids"])
    assert whole.state.epoch == 1
