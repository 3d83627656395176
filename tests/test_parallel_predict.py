"""The model-parallel stepper on CPU (its strategies are ignored outside semi-auto parallel): it computes what the
local CacheStepper computes, through generate() and through reused caches; the lockstep protocol replays rank 0's
steps; the checkpoint loader fills each rank's slices as the strategies declare them."""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from telechat_ms.errors import CheckpointError, ConfigError  # noqa: E402
from telechat_ms.infer.kv_cache import CacheStepper, DecodeSession, use_stepper_factory  # noqa: E402
from telechat_ms.job_config import ParallelConfig  # noqa: E402
from telechat_ms.model.telechat import TeleChatForCausalLM  # noqa: E402
from telechat_ms.parallel import lockstep  # noqa: E402
from telechat_ms.parallel.parallelize import parallelize_predict  # noqa: E402
from telechat_ms.parallel.predict import (ModelParallelStepper, check_layouts, layout_split,  # noqa: E402
                                          load_sharded_checkpoint, split_block, stepper_factory)

PROMPTS = [list(range(30, 50)), list(range(60, 67))]
STEPS = 20
MAX_LEN = 64


@pytest.fixture(scope="module")
def local(tiny_gqa_ckpt):
    return TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)


@pytest.fixture(scope="module")
def sharded(tiny_gqa_ckpt):
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=2))
    return model, ModelParallelStepper(model, 2, MAX_LEN, applied)


def _greedy(session, prompts, steps=STEPS):
    out = [session.prefill(prompts)]
    for _ in range(steps):
        out.append(session.decode(out[-1].argmax(-1)))
    return out


def test_sharded_write_computes_the_local_cached_path_also_over_reused_caches(local, sharded):
    model, stepper = sharded
    ref = DecodeSession(local, 2, MAX_LEN)
    ours = DecodeSession(model, 2, MAX_LEN, stepper=stepper)
    second = [list(range(90, 95)), list(range(100, 126))]       # shorter and longer than the first prompts
    for prompts in (PROMPTS, second, PROMPTS):
        for a, b in zip(_greedy(ours, prompts), _greedy(ref, prompts)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert stepper.clears >= 3          # every new prompt rewrote slots and cleared them first
    # the last prefill wrote 32 slots (its bucket); the first decode step rewrote slot 20 and cleared 20.. first
    assert stepper.written[:, :40].all() and not stepper.written[:, 40:].any()


def test_generate_through_the_stepper_factory_with_fewer_rows_than_the_cache(local, sharded):
    model, stepper = sharded
    use_stepper_factory(model, stepper_factory(stepper))
    try:
        for rows in ([PROMPTS[0]], PROMPTS):                     # 1 row padded to the stepper's 2, then 2
            got = model.generate(rows, max_new_tokens=12, eos_token_id=None, return_step_logits=True)
            want = local.generate(rows, max_new_tokens=12, eos_token_id=None, return_step_logits=True)
            assert got.sequences == want.sequences
            for a, b in zip(got.step_logits, want.step_logits):
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        with pytest.raises(ConfigError, match=r"3 row\(s\) x 6 tokens .* does not fit the model-parallel kv cache "
                                              r"of 2 x 64"):
            model.generate([[5, 6]] * 3, max_new_tokens=4)
        with pytest.raises(ConfigError, match=r"1 row\(s\) x 65 tokens"):
            model.generate([[5] * 33], max_new_tokens=32)
    finally:
        use_stepper_factory(model, None)


def test_stepper_refuses_steps_it_cannot_write(sharded):
    _, stepper = sharded
    ids = np.zeros((2, 2), np.int32)
    args = dict(positions=np.zeros((2, 2)), totals=np.ones(2), first_slot=np.zeros(2), last=0)
    with pytest.raises(ValueError, match="this stepper has 2 rows"):
        stepper.step(np.zeros((3, 2), np.int32), slots=np.zeros((3, 2)), **{**args, "positions": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="writes a slot of a row twice"):
        stepper.step(ids, slots=np.array([[3, 3], [0, 1]]), **args)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 64\)"):
        stepper.step(ids, slots=np.array([[0, 64], [0, 1]]), **args)


def test_a_rewritten_slot_clears_the_rest_of_its_row_only():
    from types import SimpleNamespace
    host = SimpleNamespace(batch=2, max_len=8, scratch=7, written=np.zeros((2, 8), bool))
    host.written[0, :6] = host.written[1, :3] = True
    assert ModelParallelStepper.stale_keep(host, np.array([[6], [3]])) is None     # both fresh
    keep = ModelParallelStepper.stale_keep(host, np.array([[4], [3]]))
    assert keep[0, 0, :, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and keep[1].min() == 1
    assert host.written[0].tolist() == [True] * 4 + [False] * 4 and host.written[1, :3].all()


class RecordingChannel:
    """Rank 0 appends what it broadcasts; a follower replays it (in-process check of the wire format)."""

    def __init__(self):
        self.messages: list[np.ndarray] = []

    def send(self, data):
        self.messages.append(np.asarray(data, np.int32).copy())

    def recv(self, shape):
        data = self.messages.pop(0)
        assert data.shape == tuple(shape)
        return data


def test_lockstep_followers_replay_rank0_steps_and_stop_also_after_a_failure(local, tiny_gqa_ckpt):
    channel = RecordingChannel()
    leader_steps = []

    class Recorder:
        def __init__(self, inner, log):
            self.inner, self.log, self.batch, self.max_len, self.cfg = inner, log, inner.batch, inner.max_len, \
                inner.cfg

        def step(self, *args):
            logits = self.inner.step(*args)
            self.log.append(([np.asarray(a).copy() for a in args], logits))
            return logits

    def work(leader):
        return _greedy(DecodeSession(local, 2, MAX_LEN, stepper=leader), PROMPTS, steps=6)

    out = lockstep.lead_or_follow(0, Recorder(CacheStepper(local, 2, MAX_LEN), leader_steps), channel, work)
    assert len(out) == 7 and int(channel.messages[-1][0]) == lockstep.OP_STOP
    follower_model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)       # rank 1's own replica
    seen = []
    assert lockstep.lead_or_follow(1, CacheStepper(follower_model, 2, MAX_LEN), channel, work,
                                   on_step=lambda inputs, logits: seen.append((inputs, logits))) is None
    assert channel.messages == [] and len(seen) == len(leader_steps) == 7
    for (inputs, logits), (sent, want) in zip(seen, leader_steps):
        for a, b in zip(inputs, sent):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(logits, want)
    # the decode ids every rank computes with are the tokens rank 0 chose
    assert [int(s[0][0][0, 0]) for s in seen[1:]] == [int(o.argmax(-1)[0]) for o in out[:-1]]

    def failing(leader):
        leader.keepalive()
        raise RuntimeError("rank 0 failed")
    with pytest.raises(RuntimeError, match="rank 0 failed"):
        lockstep.lead_or_follow(0, CacheStepper(local, 2, MAX_LEN), channel, failing)
    assert [int(m[0]) for m in channel.messages] == [lockstep.OP_KEEPALIVE, lockstep.OP_STOP]
    assert lockstep.follow(CacheStepper(local, 2, MAX_LEN), channel) == 0


def test_split_blocks_and_mindspore_layouts():
    full = np.arange(24).reshape(4, 6)
    assert split_block(full, (2, 1), 1).tolist() == full[2:].tolist()
    assert split_block(full, (1, 2), 0).tolist() == full[:, :3].tolist()
    assert split_block(full, (1, 1), 3).tolist() == full.tolist()
    # MindSpore layouts: tensor_map counts device-matrix axes from the right (-1 = not split)
    assert layout_split([1, 1, 2], [0, 1]) == (2, 1)          # column-parallel weight [out, in]
    assert layout_split([1, 2, 1], [-1, 1]) == (1, 2)         # row-parallel weight
    assert layout_split([2], [-1]) == (1,)
    check_layouts({"w": [[1, 1, 2], [0, 1]]}, {"w": (2, 1), "absent": (2, 1)})
    with pytest.raises(ConfigError, match=r"laid out parameter w as \(1, 2\), the predict strategies declare"):
        check_layouts({"w": [[1, 2, 1], [-1, 1]]}, {"w": (2, 1)})


@pytest.mark.parametrize("rank", [0, 1])
def test_loader_fills_each_rank_with_its_declared_slices(tiny_gqa_ckpt, local, rank):
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    applied = parallelize_predict(model, ParallelConfig(model_parallel=2))
    params = {p.name: p for p in model.get_parameters()}
    for name, param in params.items():       # what semi-auto's compile leaves: slice-shaped, empty parameters
        shape = split_block(param.asnumpy(), applied.param_splits[name], rank).shape
        param.set_data(ms.Tensor(np.zeros(shape, np.float32)), True)
    load_sharded_checkpoint(model, tiny_gqa_ckpt, applied.param_splits, rank)
    full = {p.name: p.asnumpy() for p in local.get_parameters()}
    for name, param in params.items():
        np.testing.assert_array_equal(param.asnumpy(), split_block(full[name], applied.param_splits[name], rank))
    wkv = params["model.layers.0.attention.wk_v.weight"].asnumpy()
    d, k = local.config.head_dim, local.config.num_key_value_heads
    assert wkv.shape[0] == 2 * d * (k // 2)                   # whole [k_h; v_h] pairs of this rank's kv heads
    params["lm_head.weight"].set_data(ms.Tensor(np.zeros((3, 64), np.float32)), True)
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \[3, 64\] on rank"):
        load_sharded_checkpoint(model, tiny_gqa_ckpt, applied.param_splits, rank)


def test_a_step_the_stepper_refuses_is_not_broadcast(sharded):
    _, stepper = sharded
    channel = RecordingChannel()
    leader = lockstep.LeaderStepper(stepper, channel)
    with pytest.raises(ValueError, match="writes a slot of a row twice"):
        leader.step(np.zeros((2, 2), np.int32), np.zeros((2, 2)), np.ones(2), np.array([[3, 3], [0, 1]]),
                    np.zeros(2), 0)
    assert channel.messages == []


def test_compiling_before_the_first_step_in_graph_mode(tiny_gqa_ckpt, local, pynative_after):
    """build_model_parallel compiles the decode step before loading (semi-auto lays out the parameters then);
    stand-alone, the compiled plain cell (GRAPH_MODE) then steps exactly like the local path."""
    ms.set_context(mode=ms.GRAPH_MODE)
    model = TeleChatForCausalLM.from_pretrained(tiny_gqa_ckpt)
    stepper = ModelParallelStepper(model, 2, MAX_LEN, parallelize_predict(model, ParallelConfig(model_parallel=2)),
                                   use_jit=False)
    assert stepper.compile() == {}                    # no parallel layout outside semi-auto parallel
    got = _greedy(DecodeSession(model, 2, MAX_LEN, stepper=stepper), PROMPTS, steps=4)
    want = _greedy(DecodeSession(local, 2, MAX_LEN), PROMPTS, steps=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_build_model_parallel_refuses_what_cannot_run_here(pynative_after):   # the context setup switched modes
    from telechat_ms.parallel.predict import build_model_parallel
    from telechat_ms.parallel.predict_job import load_predict_job
    from tests.predict_fixtures import TINY_PREDICT_YAML
    with pytest.raises(ConfigError, match="model-parallel inference needs semi_auto_parallel"):
        build_model_parallel(load_predict_job(TINY_PREDICT_YAML))
    split = load_predict_job(TINY_PREDICT_YAML, ["parallel.parallel_mode=semi_auto_parallel",
                                                 "parallel_config.model_parallel=2"])
    with pytest.raises(ConfigError, match="semi_auto_parallel needs Ascend; MindSpore cannot run it on CPU"):
        build_model_parallel(split)
