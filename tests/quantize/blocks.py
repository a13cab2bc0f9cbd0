"""Small hand-written modules shared by the quantize tests."""

from torch import nn


class PreNormMLP(nn.Module):
    """A pre-norm MLP block: ``x + fc2(gelu(fc1(norm(x))))``, x ``(B, T, d)``."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
