"""The non-private batch sampler: fixed-size batches from reshuffled epochs, resumable exactly.

(Under DP the engine's Poisson sampler replaces it: ``privacy.engine.DPEngine.sample_batch``.)
"""

from __future__ import annotations

from typing import Any

import torch


class ShuffleSampler:
    """Batches of a fixed size drawn without replacement from a reshuffled epoch order."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next_indices(self) -> torch.Tensor:
        chunks, needed = [], self.batch_size
        while needed > 0:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.num_examples, generator=self.generator)
                self.position = 0
            take = self.order[self.position:self.position + needed]
            self.position += len(take)
            needed -= len(take)
            chunks.append(take)
        return torch.cat(chunks)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])
