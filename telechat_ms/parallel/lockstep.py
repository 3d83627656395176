"""Lockstep of multi-rank inference: rank 0 decides every step's host inputs and broadcasts them, every rank runs
the same step, ranks > 0 follow until rank 0 says stop.

A model-parallel step is one compiled graph with collectives inside (all-reduces after the row-parallel matmuls,
the gather of the vocab-parallel logits), so every rank must run it with the same inputs at the same time. The
scheduler (generate's DecodeSession, the serving engine) runs on rank 0 only, behind a `LeaderStepper` that has the
stepper interface `step(ids, positions, totals, slots, first_slot, last) -> logits [B, V]`; `follow` replays the
broadcast steps on the other ranks. Rank 0 samples from its logits (seeded); the chosen tokens reach the other
ranks as the next step's ids, so every rank computes with the same tokens. Rank 0 owns the output file / port.

Wire format (int32, MindSpore Broadcast from rank 0): a header [op, B, n, last, nb], then for a step one payload
of ids, positions, slots ([B, n] each, row-major), totals and first_slot ([B] each); for a paged call
(PagedLeaderStepper: the PagedEngine's stepper interface `step(ids, positions, totals, slots, block_tables, last)`)
ids, positions, totals, slots ([R, n] each) and the block tables [R, nb]; last -1: the logits of every column
(`step_columns`, prompt scoring).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

OP_STOP, OP_STEP, OP_KEEPALIVE, OP_PAGED = 0, 1, 2, 3
HEADER = 5


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
        self.channel.send(np.array([OP_STEP, batch, n, int(last), 0]))
        self.channel.send(_payload(ids, positions, slots, totals, first_slot))
        return self.inner.step(ids, positions, totals, slots, first_slot, last)

    def keepalive(self) -> None:
        """Wake the followers without a step (an idle server calls this within the collective timeout, e.g.
        HCCL_EXEC_TIMEOUT on Ascend, so the followers' pending broadcast does not time out)."""
        if not self.stopped:
            self.channel.send(np.array([OP_KEEPALIVE, 0, 0, 0, 0]))

    def stop(self) -> None:
        """Release the followers (idempotent)."""
        if not self.stopped:
            self.stopped = True
            self.channel.send(np.array([OP_STOP, 0, 0, 0, 0]))


def _unpack_paged(payload: np.ndarray, rows: int, n: int, nb: int) -> tuple[np.ndarray, ...]:
    m = rows * n
    ids, positions, totals, slots = (payload[i * m:(i + 1) * m].reshape(rows, n) for i in range(4))
    tables = payload[4 * m:].reshape(rows, nb)
    return ids.astype(np.int32), positions.astype(np.int64), totals.astype(np.int64), slots.astype(np.int64), \
        tables.astype(np.int32)


class PagedLeaderStepper(LeaderStepper):
    """Rank 0's paged stepper (the PagedEngine's interface): broadcasts each call's host inputs, then runs it."""

    def __init__(self, inner, channel: Channel):
        self.inner, self.channel, self.cfg = inner, channel, inner.cfg
        self.num_blocks, self.block_size, self.shapes = inner.num_blocks, inner.block_size, inner.shapes
        self.stopped = False

    def _send(self, ids, positions, totals, slots, block_tables, last: int) -> None:
        if self.stopped:
            raise RuntimeError("the followers were told to stop; no further step can run")
        ids, tables = np.asarray(ids), np.asarray(block_tables)
        check = getattr(self.inner, "check", None)
        if check is not None:          # a call the stepper refuses is refused here, before any rank runs it
            check(ids, slots, tables, int(last))
        rows, n = ids.shape
        self.channel.send(np.array([OP_PAGED, rows, n, int(last), tables.shape[1]]))
        self.channel.send(np.concatenate([np.asarray(a, np.int64).ravel()
                                          for a in (ids, positions, totals, slots, tables)]))

    def step(self, ids, positions, totals, slots, block_tables, last: int) -> np.ndarray:
        self._send(ids, positions, totals, slots, block_tables, last)
        return self.inner.step(ids, positions, totals, slots, block_tables, last)

    def step_columns(self, ids, positions, totals, slots, block_tables) -> np.ndarray:
        self._send(ids, positions, totals, slots, block_tables, -1)
        return self.inner.step_columns(ids, positions, totals, slots, block_tables)


def follow(inner, channel: Channel, on_step: Callable[[tuple, np.ndarray], None] | None = None) -> int:
    """Ranks > 0: run every step rank 0 broadcasts on `inner` until it says stop; returns the number of steps.

    on_step(inputs, logits) sees each replayed step: inputs = (ids, positions, totals, slots, first_slot, last).
    """
    steps = 0
    while True:
        op, batch, n, last, nb = (int(v) for v in channel.recv((HEADER,)))
        if op == OP_STOP:
            return steps
        if op == OP_KEEPALIVE:
            continue
        if op == OP_PAGED:
            inputs = _unpack_paged(channel.recv((4 * batch * n + batch * nb,)), batch, n, nb)
            logits = inner.step_columns(*inputs) if last == -1 else inner.step(*inputs, last)
            inputs = inputs + (last,)
        elif op == OP_STEP:
            ids, positions, slots, totals, first_slot = _unpack(channel.recv((3 * batch * n + 2 * batch,)), batch, n)
            inputs = (ids, positions, totals, slots, first_slot, last)
            logits = inner.step(*inputs)
        else:
            raise RuntimeError(f"lockstep: unknown op {op} from rank 0")
        steps += 1
        if on_step is not None:
            on_step(inputs, logits)


def lead_or_follow(rank: int, inner, channel: Channel, work: Callable[[LeaderStepper], Any],
                   on_step: Callable[[tuple, np.ndarray], None] | None = None, leader_cls=LeaderStepper) -> Any:
    """Rank 0 runs work(leader) and then releases the followers (also when work fails); the other ranks follow.

    Returns work's result on rank 0 and None elsewhere.
    """
    if rank != 0:
        follow(inner, channel, on_step)
        return None
    leader = leader_cls(inner, channel)
    try:
        return work(leader)
    finally:
        leader.stop()
