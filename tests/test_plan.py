"""`telechat-ms plan`: the published setups are valid and fit, mismatched launches and impossible splits are
rejected with clear messages, the memory estimate equals a hand calculation, and the launchers obey the plan."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from telechat_ms.job_config import load_job_config
from telechat_ms.cli import main as plan_main
from telechat_ms.parallel.memory import GIB
from telechat_ms.parallel.plan import Launch, make_plan
from tests.conftest import REPO

YAMLS = os.path.join(REPO, "yaml_configs")
PUBLISHED = [("7b", 1, 58.0), ("35b", 2, 57.0), ("115b", 8, 54.5)]   # size, nodes of 8 NPUs, max_device_memory


@pytest.mark.parametrize("size,nodes,limit", PUBLISHED)
def test_published_setups_are_valid_and_fit(size, nodes, limit):
    job = load_job_config(os.path.join(YAMLS, size, f"finetune_telechat2_{size}.yaml"))
    report = make_plan(job, Launch(nodes=nodes))
    assert report.valid, [str(i) for i in report.issues]
    assert report.limit_gib == limit
    assert report.fits and report.peak.total / GIB < limit


def test_published_115b_launch_with_16_workers_is_rejected(capsys):
    rc = plan_main(["plan", "--config", os.path.join(YAMLS, "115b", "finetune_telechat2_115b.yaml"),
                    "--workers", "16"])
    out = capsys.readouterr().out
    assert rc == 1
    assert ("the launch starts 16 workers but the YAML needs data_parallel x model_parallel x pipeline_stage x "
            "context_parallel = 1 x 8 x 8 x 1 = 64") in out
    assert "launch 8 node(s) x 8 (worker_num 64)" in out and "verdict: INVALID" in out


def test_heads_not_divisible_by_mp_is_rejected(capsys):
    rc = plan_main(["plan", "--config", os.path.join(YAMLS, "7b", "finetune_telechat2_7b.yaml"),
                    "--parallel_config.model_parallel=3", "--parallel_config.data_parallel=1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "error: parallel_config.model_parallel: n_head 32 is not divisible by model_parallel = 3" in out


def test_every_shipped_yaml_is_valid_for_its_own_size_of_launch():
    for path in glob.glob(os.path.join(YAMLS, "*", "*.yaml")):
        job = load_job_config(path)
        report = make_plan(job, Launch(workers=job.parallel_config.world_size))
        assert report.valid, (path, [str(i) for i in report.issues])
        assert report.fits, (path, report.peak.total / GIB, report.limit_gib)


def _small_case(tmp_path) -> str:
    data = {
        "context": {"device_target": "Ascend", "max_device_memory": "1GB"},
        "parallel": {"parallel_mode": "semi_auto_parallel", "enable_parallel_optimizer": True},
        "parallel_config": {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2,
                            "use_seq_parallel": True},
        "recompute_config": {"recompute": False, "select_recompute": True},
        "model": {"model_config": {"vocab_size": 256, "hidden_size": 64, "n_layer": 4, "n_head": 4,
                                   "num_key_value_heads": 2, "ffn_hidden_size": 128, "seq_length": 32,
                                   "compute_dtype": "bfloat16", "use_flash_attention": True,
                                   "fused_rms_norm": True}},
        "runner_config": {"batch_size": 1},
    }
    path = str(tmp_path / "small.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh)
    return path


def test_memory_estimate_equals_a_hand_calculation(tmp_path):
    """h 64, 4 heads / 2 kv heads (d 16, kd 32), f 128, V 256, 4 layers; dp 2 x mp 2 x pp 2, sp, 2 micro
    batches of 1 x 32 tokens, bf16 compute / fp32 params, parallel optimizer, selective recompute, flash attn.

    Per layer: matrices 2*64^2 + 2*32*64 + 3*64*128 = 36864 (18432 per mp rank), norms + biases 4*64 = 256.
    Stage 0 holds layers 0-1 and the embedding (256*64 / mp 2 = 8192); stage 1 layers 2-3, lm_head 8192, ln_f 64.
    Activations per layer and micro batch (X = 32*64 = 2048, Xk = 1024, Xf = 4096, t = 2), elements:
    norm inputs 2X/t 2048 + gathered matmul inputs 2X 4096 + q,k,v (X+2Xk)/t 2048 + FA out X/t 1024
    + wo input X/t 1024 + w1,w3 outputs 2Xf/t 4096 = 14336 -> x 2 B = 28672 B; without recompute the MLP keeps
    4Xf/t = 8192 -> 18432 elements = 36864 B (the working set).
    """
    job = load_job_config(_small_case(tmp_path))
    report = make_plan(job, Launch(workers=8))
    assert report.valid, [str(i) for i in report.issues]
    s0, s1 = report.stages
    hand0 = {"weights": 4 * (36864 / 2 + 512 + 8192 / 2),        # PO shards over dp*cp = 2 (embedding over dp)
             "gradients": 0,                                   # the pipeline adds them into its buffers
             "grad_buffers": 4 * (36864 / 2 + 512 + 8192 / 2),  # accumulation buffers, sharded like weights
             "optimizer": 8 * (36864 / 2 + 512 + 8192 / 2),
             "copies": 2 * 36864,                              # bf16 casts of the two selective layers
             "activations": 2 * 2 * 28672,                     # 2 micro batches in flight x 2 layers
             "working": 36864, "logits": 0}
    hand1 = {"weights": 4 * (36864 / 2 + 512 + 8192 / 2 + 64), "gradients": 0,
             "grad_buffers": 4 * (36864 / 2 + 512 + 8192 / 2 + 64),
             "optimizer": 8 * (36864 / 2 + 512 + 8192 / 2 + 64), "copies": 2 * (36864 + 8192),
             "activations": 1 * 2 * 28672, "working": 36864,
             "logits": (2 * 256 / 2 + 8 * 256 / 2) * 32}       # bf16 logits + fp32 logits + log-softmax, / mp
    assert s0.parts == pytest.approx(hand0) and s1.parts == pytest.approx(hand1)
    assert s0.total == pytest.approx(593920) and s1.total == pytest.approx(594944)
    assert report.peak is s1 and report.fits


def test_plan_cli_is_registered_and_exit_codes(capsys):
    from telechat_ms.cli import main
    assert main(["plan", "--config", os.path.join(YAMLS, "35b", "finetune_telechat2_35b.yaml"), "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "verdict: VALID, fits in memory" in out and "weights    = 4 B x params" in out
    over = ["plan", "--config", os.path.join(YAMLS, "7b", "finetune_telechat2_7b.yaml"),
            "--context.max_device_memory=10GB"]
    assert plan_main(over) == 3


LAUNCHER = os.path.join(REPO, "run_scripts", "msrun_train_multinode.sh")


def _launch(*args: str, launcher: str = LAUNCHER) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", launcher, *args], capture_output=True, text=True, env=env, timeout=120)


def test_multinode_launcher_refuses_a_mismatched_launch_and_builds_msrun_for_a_valid_one():
    cfg = os.path.join(YAMLS, "115b", "finetune_telechat2_115b.yaml")
    bad = _launch(cfg, "16", "8", "192.168.1.1", "8118", "0", "output/msrun_log", "False", "300")
    assert bad.returncode == 1 and "refusing to launch" in bad.stderr and "= 64" in bad.stdout
    good = _launch(cfg, "64", "8", "192.168.1.1", "8118", "3", "output/msrun_log", "False", "300",
                   "--runner_config.epochs=1")
    assert good.returncode == 0, good.stderr
    cmd = good.stdout.strip().splitlines()[-1]
    for part in ("msrun", "--worker_num=64", "--local_worker_num=8", "--master_addr=192.168.1.1",
                 "--master_port=8118", "--node_rank=3", "--log_dir=output/msrun_log", "--join=False",
                 "--cluster_time_out=300", "train --config", "--runner_config.epochs=1"):
        assert part in cmd, cmd
    assert _launch(cfg, "64", "8", "192.168.1.1", "8118", "8").returncode == 2   # node rank out of range


# ---------------------------------------------------------------- predict YAMLs
PREDICT = [("7b", 1), ("35b", 2), ("115b", 8)]   # the MindSpore port's layouts: model_parallel per size


@pytest.mark.parametrize("size,mp", PREDICT)
def test_predict_yamls_fit_at_the_ports_layout_with_their_kv_cache(size, mp, capsys):
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.parallel.memory import HBM_GBS_ATLAS_800T_A2
    path = os.path.join(YAMLS, size, f"predict_telechat2_{size}.yaml")
    assert plan_main(["plan", "--config", path, "--workers", str(mp)]) == 0
    out = capsys.readouterr().out
    report = make_plan(load_job_config(path), Launch(workers=mp))
    assert report.valid and report.fits and report.dims.mp == mp and report.limit_gib == 58.0
    cfg = TeleChatConfig.preset(size)
    p, parts = report.predict, report.stages[0].parts
    # weights: bf16, every matrix and both vocabulary tables cut mp ways (norms and biases whole)
    h, f, kd, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.vocab_size
    matrices = cfg.n_layer * (2 * h * h + 2 * kd * h + 3 * h * f) + 2 * v * h
    assert parts["weights"] == pytest.approx(2 * (matrices / mp + cfg.n_layer * 4 * h + h))
    assert parts["weights"] == pytest.approx(2 * cfg.num_parameters() / mp, rel=0.001)
    assert p.kv_per_token == 2 * 2 * cfg.n_layer * kd / mp                      # bf16 keys and values, 1/mp heads
    assert parts["kv_cache"] == p.kv_per_token * 1 * 8192
    assert p.decode.tokens_per_s == pytest.approx(HBM_GBS_ATLAS_800T_A2 * 1e9 / (parts["weights"] + parts["kv_cache"]))
    published = {"7b": 54.1, "35b": 27.7, "115b": 26.5}[size]
    assert p.published == published and published < p.decode.tokens_per_s    # the estimate is an upper bound
    assert p.max_batch >= 1 and p.max_seq >= 8192
    assert f"published (MindSpore port, Atlas 800T A2, TeleChat2-{size.upper()}): {published} tokens/s" in out
    assert "kv cache per NPU:" in out and "largest that fits 58.00 GiB: batch" in out
    assert "kv_cache   = a x 2 x layers x b x L x K x d / mp" in out and "verdict: VALID, fits in memory" in out


def test_35b_needs_two_npus_and_115b_rejects_a_split_of_its_kv_heads(capsys):
    y35 = os.path.join(YAMLS, "35b", "predict_telechat2_35b.yaml")
    one = make_plan(load_job_config(y35, ["parallel_config.model_parallel=1", "parallel.parallel_mode=stand_alone"]))
    assert one.valid and not one.fits and one.peak.total / GIB > 58       # 70 GB of bf16 weights alone
    y115 = os.path.join(YAMLS, "115b", "predict_telechat2_115b.yaml")
    assert plan_main(["plan", "--config", y115, "--workers", "6", "--parallel_config.model_parallel=6"]) == 1
    out = capsys.readouterr().out
    assert "num_key_value_heads 8 is not divisible by model_parallel = 6" in out and "verdict: INVALID" in out
    assert plan_main(["plan", "--config", y115, "--workers", "4"]) == 1   # the YAML needs 8 workers
    assert "the launch starts 4 workers but the YAML needs" in capsys.readouterr().out


def test_predict_memory_equals_a_hand_calculation():
    """h 64, 4 heads / 2 kv heads (d 16, Kd 32), f 128, V 256, 2 layers, mp 2, batch 2 x L 32, bf16 weights and
    compute, flash attention. Weights: matrices 2 x (2*64^2 + 2*32*64 + 3*64*128) = 73728 + vocab 2*256*64 = 32768,
    cut in 2 = 53248; norms and biases 2 x 4 x 64 = 512; ln_f 64 -> 2 B x 53824. kv: 2 B x 2 x 2 layers x 2 x 32 x
    32 / 2 = 8192. Working: 2 B x 2 x 32 x (256 + (64 + 64)/2 + 384/2) = 65536, plus the kv heads repeated for flash
    attention, 2 B x 2 (k, v) x 2 x 32 x 4 heads x 16 / 2 = 8192: 73728. Logits 4 B x 2 x 256 = 2048."""
    from telechat_ms.config import TeleChatConfig
    from telechat_ms.parallel.layout import ParallelDims
    from telechat_ms.parallel.memory import kv_bytes_per_token, predict_memory
    cfg = TeleChatConfig(hidden_size=64, n_head=4, num_key_value_heads=2, ffn_hidden_size=128, vocab_size=256,
                         n_layer=2, compute_dtype="bfloat16", param_dtype="bfloat16", use_flash_attention=True)
    mem = predict_memory(cfg, ParallelDims(mp=2), batch=2, seq=32)
    assert mem.parts == {"weights": 2 * 53824, "kv_cache": 8192, "working": 73728, "logits": 2048}
    assert kv_bytes_per_token(cfg, ParallelDims(mp=2)) == 128


@pytest.mark.parametrize("override", ["--parallel_config.pipeline_stage=2", "--optimizer.eps=1e-6"])
def test_plan_refuses_predict_yamls_with_training_or_pipeline_keys(override, capsys):
    path = os.path.join(YAMLS, "115b", "predict_telechat2_115b.yaml")
    assert plan_main(["plan", "--config", path, override]) == 2
    assert "error:" in capsys.readouterr().err


PREDICT_LAUNCHER = os.path.join(REPO, "run_scripts", "msrun_predict.sh")


def _predict_launch(*args: str) -> subprocess.CompletedProcess:
    return _launch(*args, launcher=PREDICT_LAUNCHER)


def test_predict_launcher_checks_the_worker_count_against_the_yaml_and_builds_msrun():
    y115 = os.path.join(YAMLS, "115b", "predict_telechat2_115b.yaml")
    good = _predict_launch(y115, "--input", "q.jsonl", "--output", "a.jsonl", "--load_checkpoint=/data/115b")
    assert good.returncode == 0, good.stderr
    assert "verdict: VALID, fits in memory" in good.stdout               # plan ran first
    cmd = good.stdout.strip().splitlines()[-1]
    for part in ("msrun", "--worker_num=8", "--local_worker_num=8", "--tail_worker_log=0", "generate --config", y115,
                 "--input q.jsonl", "--output a.jsonl", "--load_checkpoint=/data/115b"):
        assert part in cmd, cmd
    bad = _predict_launch(y115, "6", "--prompt", "hi")
    assert bad.returncode == 1 and "refusing to launch" in bad.stderr
    assert "the launch starts 6 workers but the YAML needs" in bad.stdout and "msrun --worker_num" not in bad.stdout
    # mp from the overrides too: the 35B YAML at mp 4 needs 4 workers
    y35 = os.path.join(YAMLS, "35b", "predict_telechat2_35b.yaml")
    assert _predict_launch(y35, "2", "--prompt", "hi", "--parallel_config.model_parallel=4").returncode == 1
    assert "--worker_num=4" in _predict_launch(y35, "--prompt", "hi", "--parallel_config.model_parallel=4").stdout
    # today's data-parallel replicas without a YAML
    dp = _predict_launch("2", "/data/7b", "in.jsonl", "out.jsonl", "--batch-size", "4")
    assert dp.returncode == 0 and "--worker_num=2" in dp.stdout and "--data-parallel" in dp.stdout


def test_gradient_buffers_appear_only_with_accumulation():
    """The fused step keeps no gradient buffers: plan counts fp32 buffers (4 B x params) only when gradients are
    accumulated, as their own line; the step's own gradients are counted either way."""
    from telechat_ms.parallel.plan import format_plan
    path = os.path.join(YAMLS, "tiny", "finetune_tiny_cpu.yaml")
    plain = make_plan(load_job_config(path, ["--runner_config.gradient_accumulation_steps=1"]), Launch(workers=1))
    accu = make_plan(load_job_config(path, ["--runner_config.gradient_accumulation_steps=4"]), Launch(workers=1))
    params = load_job_config(path).model_config().num_parameters()
    (a,), (b,) = plain.stages, accu.stages
    assert "grad_buffers" not in a.parts and b.parts["grad_buffers"] == pytest.approx(4 * params, rel=1e-3)
    assert a.parts["gradients"] == b.parts["gradients"] == pytest.approx(4 * params, rel=1e-3)
    assert b.total - a.total == pytest.approx(b.parts["grad_buffers"])
    assert "grad_bufs" not in format_plan(plain) and "grad_bufs" in format_plan(accu)
