"""A tiny multilingual text encoder projection, made on the fly and saved as TorchScript."""

from __future__ import annotations

from pathlib import Path

import torch


class LinearToHiddenStates(torch.nn.Module):
    """[1, S, 512] → [1, C, 1, S]: a linear layer with the layout change inside the file."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(512, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).transpose(1, 2).unsqueeze(2)


def save_projection(path: Path, width: int = 32, seed: int = 0, layout: str = "BC1S") -> Path:
    """Save a seeded projection to ``path`` with ``torch.jit.save``.

    ``layout``: ``BC1S`` (the file gives [1, C, 1, S]) or ``BSC`` (a bare
    ``torch.nn.Linear``, [1, S, C], what Apple's converter takes).
    """
    torch.manual_seed(seed)
    module = LinearToHiddenStates(width) if layout == "BC1S" else torch.nn.Linear(512, width)
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return Path(path)
