"""Tiny models built in the test, never downloaded."""

from __future__ import annotations

import torch


class TinyNet(torch.nn.Module):
    """An MLP with a 'head': mixed shapes, biases, and a group to mark fully trainable."""

    def __init__(self, d_in: int = 12, d_hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(d_in, d_hidden), torch.nn.Tanh(), torch.nn.Linear(d_hidden, d_hidden), torch.nn.Tanh()
        )
        self.norm = torch.nn.LayerNorm(d_hidden)
        self.head = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def batches(n: int, seed: int = 0, d_in: int = 12, d_out: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d_in, generator=g), torch.randint(0, d_out, (8,), generator=g)) for _ in range(n)]
