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
    """The generators of FDP's reparameterisation noise, private to the distiller: one per device.

    Each process seeds them differently (so ranks draw different noise), and under ``nn.DataParallel`` each
    replica's device has its own generator, seeded apart by the device index, so that replicas neither share
    draws nor restart a shared generator when the device changes. Their states are saved in checkpoints so
    that a resumed run draws exactly the noise the uninterrupted run would have.
    """

    # Seeds of two devices of one process lie this far apart, beyond any process offset (seed + rank).
    DEVICE_SEED_STRIDE = 1 << 20
    # The key of a single restored state (a single-device run): it restores the first device used, whichever.
    FIRST_DEVICE = "first"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def _generator_for(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is not None:
            return generator
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed + self.DEVICE_SEED_STRIDE * (device.index or 0))
        state = self._pending.pop(str(device), None)
        if state is None and not self._generators:
            state = self._pending.pop(self.FIRST_DEVICE, None)
        if state is not None:
            generator.set_state(state)
        # nn.DataParallel's replicas run in threads, one per device: each sets its own key.
        self._generators[device] = generator
        return generator

    # torch.Generator cannot be traced: under torch.compile the draw runs eagerly, the rest stays compiled.
    @torch.compiler.disable
    def _normal(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._generator_for(like.device), device=like.device,
                           dtype=like.dtype)

    def sample(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """``z = mu + exp(log_var / 2) * eps`` with ``eps ~ N(0, I)``."""
        return mu + torch.exp(0.5 * log_var) * self._normal(mu)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Each device's generator state (uint8 tensors), keyed by device name; restored ones not yet used too."""
        states = dict(self._pending)
        states.update({str(device): generator.get_state() for device, generator in self._generators.items()})
        return states

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore states, each applied to its device's generator on its next use. A single state restores the
        first device used, so a run resumes on another device than the one it was saved on."""
        self._generators = {}
        self._pending = {self.FIRST_DEVICE: next(iter(states.values()))} if len(states) == 1 else dict(states)
