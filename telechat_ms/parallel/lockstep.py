"""Lockstep of multi-rank inference: rank 0 decides every step's host inputs and broadcasts them, every rank runs
the same step, ranks > 0 follow until rank 0 says stop.

A model-parallel step is one compiled graph with collectives inside (all-reduces after the row-parallel matmuls,
the gather of the vocab-parallel logits), so every rank must run it with the same inputs at the same time. The
scheduler (generate's DecodeSession, the serving engine) runs on rank 0 only, behind a `LeaderStepper` that has the
stepper interface `step(ids, positions, totals, slots, first_slot, last) -> logits [B, V]`; `follow` replays the
broadcast steps on the other ranks. Rank 0 samples from its logits (seeded); the chosen tokens reach the other
ranks as the next step's ids, so every rank computes with the same tokens. Rank 0 owns the output file / port.

Wire format (int32, MindSpore Broadcast from rank 0): a header [op, B, n, last], then for a step one payload of
ids, positions, slots ([B, n] each, row-major), totals and first_slot ([B] each).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

OP_STOP, OP_STEP, OP_KEEPALIVE = 0, 1, 2
HEADER = 4


class Channel(Protocol):
    """Rank 0's messages to every rank: send on rank 0, recv (of a known shape) on the others."""

    def send(self, data: np.ndarray) -> None: ...

    def recv(self, shape: tuple[int, ...]) -> np.ndarray: ...


class BroadcastChannel:
    """A Channel over MindSpore's collective Broadcast (HCCL on Ascend; the mccl backend on CPU under msrun)."""

    def __init__(self, root: int = 0):
        from mindspore import ops
        self._broadcast = ops.Broadcast(root)

    def _run(self, data: np.ndarray) -> np.ndarray:
        from mindspore import Tensor
        return self._broadcast((Tensor(np.ascontiguousarray(data, np.int32)),))[0].asnumpy()

    def send(self, data: np.ndarray) -> None:
        self._run(data)

    def recv(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._run(np.zeros(shape, np.int32))


def _payload(ids, positions, slots, totals, first_slot) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.int64).ravel() for a in (ids, positions, slots, totals, first_slot)])


def _unpack(payload: np.ndarray, batch: int, n: int) -> tuple[np.ndarray, ...]:
    m = batch * n
    ids, positions, slots = (payload[i * m:(i + 1) * m].reshape(batch, n) for i in range(3))
    totals, first_slot = payload[3 * m:3 * m + batch], payload[3 * m + batch:]
    return ids.astype(np.int32), positions.astype(np.int64), slots.astype(np.int64), totals.astype(np.int64), \
        first_slot.astype(np.int64)


class LeaderStepper:
    """Rank 0's stepper: broadcasts each step's host inputs, then runs the step itself (same signature)."""

    def __init__(self, inner, channel: Channel):
        self.inner, self.channel = inner, channel
        self.batch, self.max_len, self.cfg = inner.batch, inner.max_len, inner.cfg
        self.stopped = False

    def step(self, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray, slots: np.ndarray,
             first_slot: np.ndarray, last: int) -> np.ndarray:
        if self.stopped:
            raise RuntimeError("the followers were told to stop; no further step can run")
        ids = np.asarray(ids)
        check = getattr(self.inner, "check", None)
        if check is not None:          # a step the stepper refuses is refused here, before any rank runs it
            check(ids, slots, int(last))
        batch, n = ids.shape
        self.channel.send(np.array([OP_STEP, batch, n, int(last)]))
        self.channel.send(_payload(ids, positions, slots, totals, first_slot))
        return self.inner.step(ids, positions, totals, slots, first_slot, last)

    def keepalive(self) -> None:
        """Wake the followers without a step (an idle server calls this within the collective timeout, e.g.
        HCCL_EXEC_TIMEOUT on Ascend, so the followers' pending broadcast does not time out)."""
        if not self.stopped:
            self.channel.send(np.array([OP_KEEPALIVE, 0, 0, 0]))

    def stop(self) -> None:
        """Release the followers (idempotent)."""
        if not self.stopped:
            self.stopped = True
            self.channel.send(np.array([OP_STOP, 0, 0, 0]))


def follow(inner, channel: Channel, on_step: Callable[[tuple, np.ndarray], None] | None = None) -> int:
    """Ranks > 0: run every step rank 0 broadcasts on `inner` until it says stop; returns the number of steps.

    on_step(inputs, logits) sees each replayed step: inputs = (ids, positions, totals, slots, first_slot, last).
    """
    steps = 0
    while True:
        op, batch, n, last = (int(v) for v in channel.recv((HEADER,)))
        if op == OP_STOP:
            return steps
        if op == OP_KEEPALIVE:
            continue
        if op != OP_STEP:
            raise RuntimeError(f"lockstep: unknown op {op} from rank 0")
        ids, positions, slots, totals, first_slot = _unpack(channel.recv((3 * batch * n + 2 * batch,)), batch, n)
        logits = inner.step(ids, positions, totals, slots, first_slot, last)
        steps += 1
        if on_step is not None:
            on_step((ids, positions, totals, slots, first_slot, last), logits)


def lead_or_follow(rank: int, inner, channel: Channel, work: Callable[[LeaderStepper], Any],
                   on_step: Callable[[tuple, np.ndarray], None] | None = None) -> Any:
    """Rank 0 runs work(leader) and then releases the followers (also when work fails); the other ranks follow.

    Returns work's result on rank 0 and None elsewhere.
    """
    if rank != 0:
        follow(inner, channel, on_step)
        return None
    leader = LeaderStepper(inner, channel)
    try:
        return work(leader)
    finally:
        leader.stop()
