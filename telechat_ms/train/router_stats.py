"""MoE router statistics for metrics.jsonl: tokens routed to each expert, choices dropped by the capacity rule, and
the load-balancing loss, summed over the layers and the micro batches of one optimizer step (this rank's share)."""
from __future__ import annotations

import numpy as np


class RouterStats:
    """Reads the statistics every MoE layer keeps of its last training forward (TeleChatMoE.router_*)."""

    def __init__(self, model) -> None:
        self.layers = [cell for _, cell in model.cells_and_names() if hasattr(cell, "router_tokens")]
        self.reset()

    def reset(self) -> None:
        n = self.layers[0].router_tokens.shape[0] if self.layers else 0
        self.tokens = np.zeros(n, dtype=np.int64)
        self.dropped = 0
        self.aux = 0.0
        self.micro = 0

    def collect(self) -> None:
        """After one micro batch: add its statistics."""
        for layer in self.layers:
            self.tokens += layer.router_tokens.asnumpy().astype(np.int64)
            self.dropped += int(layer.router_dropped.asnumpy()[0])
            self.aux += float(layer.router_aux.asnumpy()[0])
        self.micro += 1

    def pop(self) -> dict:
        """The step's record (then reset): tokens per expert summed over layers, dropped choices, the mean over
        micro batches of the aux loss summed over layers."""
        total = int(self.tokens.sum())
        record = {"aux_loss": self.aux / max(self.micro, 1), "expert_tokens": self.tokens.tolist(),
                  "dropped_tokens": self.dropped,
                  "dropped_fraction": self.dropped / total if total else 0.0}
        self.reset()
        return record
