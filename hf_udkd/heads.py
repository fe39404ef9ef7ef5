"""The trainable UniKD heads: Adaptive Feature Fusion and Feature Distribution Prediction (METHOD.md §2-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (B, C, H, W) map; shrinking averages, since nearest would keep a single pixel of a 1x1 target."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


class AdaptiveFeatureFusion(nn.Module):
    """Fuses student stage maps, deepest first, into one map shaped like the teacher tap.

    For each level l from deepest to shallowest: ``x_l = ReLU(Conv1x1(F_l -> width))``; with a deeper
    result ``r`` (upsampled to x_l's size), ``[a, b] = sigmoid(Conv1x1([x_l; r] -> 2))`` and
    ``R_l = a * x_l + b * r``. The shallowest result is resized to the teacher tap and
    ``O = ReLU(Conv3x3(R_1 -> out_channels))``.

    Args:
        in_channels: channels of the student levels, shallow to deep.
        width: the fusion width M (the main cost of UniKD, see benchmarks/).
        out_channels: channels of the teacher tap, C_T.
        out_size: (H_T, W_T) of the teacher tap.
        batch_norm: BatchNorm after the 1x1 convs (ReviewKD's original) instead of none.
        init: ``"default"`` (PyTorch's conv initialisation, with biases) or ``"kaiming"`` (the development
            code's: Kaiming-uniform with a=1 for the 1x1 and output convs, which then have no bias).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        width: int,
        out_channels: int,
        out_size: tuple[int, int],
        batch_norm: bool = False,
        init: str = "default",
    ):
        super().__init__()
        kaiming = init == "kaiming"
        self.out_size = tuple(out_size)
        self.laterals = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, width, kernel_size=1, bias=not (batch_norm or kaiming)),
                nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
                nn.ReLU(inplace=True),
            )
            for c in in_channels
        )
        # One attention conv per level that has a deeper neighbour (all but the deepest).
        self.attentions = nn.ModuleList(
            nn.Conv2d(2 * width, 2, kernel_size=1) for _ in range(len(in_channels) - 1)
        )
        self.output = nn.Sequential(
            nn.Conv2d(width, out_channels, kernel_size=3, padding=1, bias=not kaiming), nn.ReLU(inplace=True)
        )
        if kaiming:
            # As ReviewKD's ABF, which the development code follows; its attention conv keeps the default.
            for conv in [lateral[0] for lateral in self.laterals] + [self.output[0]]:
                nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: (B, C_l, H_l, W_l) maps, shallow to deep -> (B, C_T, H_T, W_T)."""
        fused = self.laterals[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            x = self.laterals[level](features[level])
            r = F.interpolate(fused, size=x.shape[-2:], mode="nearest")
            a, b = torch.sigmoid(self.attentions[level](torch.cat([x, r], dim=1))).chunk(2, dim=1)
            fused = a * x + b * r
        return self.output(_resize(fused, self.out_size))


class FeatureDistributionHead(nn.Module):
    """Predicts a diagonal Gaussian over the K classes from a feature map (FDP).

    ``g = GAP(X)``, ``mu = Linear(g)``, ``log_var = clamp(Linear(g), -10, 10)``. Accepts a map
    (B, C, H, W) or an already pooled (B, C) feature (what the teacher cache stores).
    """

    def __init__(self, in_channels: int, num_classes: int, log_var_bound: float = 10.0):
        super().__init__()
        self.mu = nn.Linear(in_channels, num_classes)
        self.log_var = nn.Linear(in_channels, num_classes)
        self.log_var_bound = log_var_bound

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) or (B, C) -> (mu, log_var), each (B, K)."""
        g = x.mean(dim=(-2, -1)) if x.dim() == 4 else x
        log_var = self.log_var(g).clamp(-self.log_var_bound, self.log_var_bound)
        return self.mu(g), log_var


class NoiseSource:
    """The generator of FDP's reparameterisation noise, private to the distiller.

    Each process seeds it differently (so ranks draw different noise), and its state is saved in
    checkpoints so that a resumed run draws exactly the noise the uninterrupted run would have.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def sample(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """``z = mu + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)``."""
        eps = torch.randn(mu.shape, generator=self._generator_for(mu.device), device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * log_var) * eps

    def get_state(self) -> torch.Tensor | None:
        """The generator state (a uint8 tensor), or the restored one not yet used."""
        if self._generator is None:
            return self._pending_state
        return self._generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a state; applied to the generator on its next use, on whatever device that is."""
        self._generator = None
        self._pending_state = state
