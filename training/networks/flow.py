"""DenseFlow-25-6, the normalizing flow that generates synthetic negatives (methods.md §4).

The anomaly-detection variant of Open-set-M2F: uniform dequantisation, three levels of
invertible dense blocks (cross-unit coupling + glow-like steps with dense coupling networks),
squeeze + factor-out between levels, and a resolution-agnostic base with a learned loc and
log-scale per channel. Images and samples are RGB in 0..255, the segmenter's range.

Sampling inverts the dequantisation continuously, x = 256 z, then clamps to [0, 255] with a
straight-through clamp: the forward value is clamped, the backward pass is the identity. A hard
clamp would give saturated pixels zero gradient, so the segmenter's loss (JSD, L_x, L_d) could
not pull a sample that left the range back into it.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import math
from typing import Any

import torch
from torch import nn

from anomaly_seg_node.errors import ConfigError, DataError
from training.networks.flow_modules import (
    InvertibleDenseBlock,
    Transition,
    squeeze2d,
    std_normal_log_prob,
    unsqueeze2d,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Open-set-M2F denseflow/dense_flow.py defaults: 3*3 + 2*4 + 1*8 = 25 steps, growth 6.
    '25-6': {'block_config': [3, 2, 1], 'layers_config': [3, 4, 8], 'mid_channels': [32, 32, 32],
             'growth_rate': 6, 'dense_depth': 7, 'dense_growth': 64},
    # methods.md §4 "minimal faithful CPU configuration": every mechanism, ~55k parameters.
    'tiny': {'block_config': [2, 1, 1], 'layers_config': [1, 1, 1], 'mid_channels': [16, 16, 16],
             'growth_rate': 2, 'dense_depth': 2, 'dense_growth': 16},
}

_CONFIG_KEYS = ('block_config', 'layers_config', 'mid_channels', 'growth_rate', 'dense_depth',
                'dense_growth', 'num_bits', 'in_channels', 'checkpointing')

Latents = list[torch.Tensor]
Etas = list[list[torch.Tensor]]


def _straight_through_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return x + (x.clamp(low, high) - x).detach()


class DenseFlow(nn.Module):
    """DenseFlow over RGB images in 0..255 whose sides are multiples of 8.

    Args:
        block_config: units per level (one dense block per level).
        layers_config: glow-like steps per unit, per level.
        mid_channels: width of the coupling networks, per level.
        growth_rate: noise channels appended by each cross-unit coupling.
        dense_depth: dense layers in a coupling network's residual dense block.
        dense_growth: channels each dense layer adds.
        num_bits: bits per colour value (8: integers 0..255 dequantised into 256 bins).
        in_channels: image channels.
        checkpointing: recompute coupling-network activations in backward to save memory.
    """

    def __init__(self, block_config: Sequence[int] = (3, 2, 1),
                 layers_config: Sequence[int] = (3, 4, 8),
                 mid_channels: Sequence[int] = (32, 32, 32), growth_rate: int = 6,
                 dense_depth: int = 7, dense_growth: int = 64, num_bits: int = 8,
                 in_channels: int = 3, checkpointing: bool = False) -> None:
        super().__init__()
        levels = len(block_config)
        if levels < 1 or len(layers_config) != levels or len(mid_channels) != levels:
            raise ConfigError(
                f'DenseFlow needs block_config, layers_config and mid_channels of one equal, '
                f'non-zero length (one entry per level); got {list(block_config)}, '
                f'{list(layers_config)}, {list(mid_channels)}. Give one value per level.')
        ints = [*block_config, *layers_config, *mid_channels, dense_depth, dense_growth,
                num_bits, in_channels]
        if any(int(v) != v or v < 1 for v in ints) or int(growth_rate) != growth_rate \
                or growth_rate < 0:
            raise ConfigError(
                'DenseFlow sizes must be positive integers (growth_rate may be 0); got '
                f'{ints + [growth_rate]}. Fix the flow configuration.')
        self._config = {
            'block_config': [int(v) for v in block_config],
            'layers_config': [int(v) for v in layers_config],
            'mid_channels': [int(v) for v in mid_channels], 'growth_rate': int(growth_rate),
            'dense_depth': int(dense_depth), 'dense_growth': int(dense_growth),
            'num_bits': int(num_bits), 'in_channels': int(in_channels),
            'checkpointing': bool(checkpointing)}
        self.num_bins = 2 ** int(num_bits)
        self.in_channels = int(in_channels)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        channels = 4 * self.in_channels  # after the initial squeeze
        for level in range(levels):
            block = InvertibleDenseBlock(channels, block_config[level], layers_config[level],
                                         growth_rate, mid_channels[level], dense_depth,
                                         dense_growth, checkpointing)
            self.blocks.append(block)
            channels = block.out_channels
            if level < levels - 1:
                self.transitions.append(Transition())
                channels *= 2  # squeeze x4, keep half
        self.latent_channels = channels
        self.base_loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.base_log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @property
    def downsampling(self) -> int:
        """Image sides must be multiples of this (initial squeeze + one per transition)."""
        return 2 ** len(self.blocks)

    @classmethod
    def from_preset(cls, name: str, *, checkpointing: bool = False) -> DenseFlow:
        """'25-6' (the paper's DenseFlow-25-6) or 'tiny' (the CPU test configuration)."""
        if name not in PRESETS:
            raise ConfigError(f'unknown DenseFlow preset {name!r}; expected one of '
                              f'{sorted(PRESETS)}.')
        return cls(**PRESETS[name], checkpointing=checkpointing)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DenseFlow:
        """Rebuild a flow from `config()` (e.g. stored in a checkpoint)."""
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f'unknown DenseFlow config keys {unknown}; expected a subset of '
                              f'{list(_CONFIG_KEYS)}. Use DenseFlow.config() to write one.')
        return cls(**config)

    def config(self) -> dict[str, Any]:
        """Plain dict of the constructor arguments (lists, ints, bools)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    # ---- shapes and checks ------------------------------------------------------------------

    def _check_size(self, h: int, w: int, what: str) -> None:
        f = self.downsampling
        if h < f or w < f or h % f or w % f:
            raise DataError(
                f'DenseFlow {what} needs height and width that are positive multiples of {f} '
                f'(the flow squeezes {len(self.blocks)} times); got {h}x{w}. Crop or pad the '
                f'patch to a multiple of {f}.')

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f'DenseFlow expects images [N, {self.in_channels}, H, W]; got '
                            f'{shape}. Stack the crops into one 4-D batch.')
        self._check_size(x.shape[2], x.shape[3], 'input')
        x = x.to(self.base_loc.dtype)
        low, high = x.min().item(), x.max().item()
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > self.num_bins - 1:
            raise DataError(
                f'DenseFlow expects colour values in [0, {self.num_bins - 1}]; got '
                f'[{low:g}, {high:g}]. Pass RGB 0..255 (multiply [0, 1] images by 255).')
        return x

    def latent_shapes(self, n: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Shapes of `encode`'s latents for h x w images: factored-out halves, then the base."""
        shapes = []
        c, h, w = 4 * self.in_channels, h // 2, w // 2
        for block, _ in zip(self.blocks, self.transitions, strict=False):
            c, h, w = 2 * block.out_channels, h // 2, w // 2
            shapes.append((n, c, h, w))
        return shapes + [(n, self.latent_channels, h, w)]

    def noise_shapes(self, n: int, h: int, w: int) -> list[list[tuple[int, int, int, int]]]:
        """Shapes of the cross-unit noises eta, per level, for h x w images."""
        shapes = []
        h, w = h // 2, w // 2
        for block in self.blocks:
            shapes.append(block.noise_shapes(n, h, w))
            h, w = h // 2, w // 2
        return shapes

    # ---- the bijection between dequantised images and latents -------------------------------

    def encode(self, y: torch.Tensor, etas: Etas | None = None
               ) -> tuple[Latents, torch.Tensor, torch.Tensor]:
        """Dequantised images y in [0, 1] -> (latents, ldj, log_q).

        latents: the factored-out halves (one per transition) then the base latent. ldj is the
        log|det| of (y, etas) -> latents; log_q = log N(etas) of the cross-unit noises (drawn
        when `etas` is None).
        """
        z = squeeze2d(y - 0.5)
        ldj = z.new_zeros(z.shape[0])
        log_q = z.new_zeros(z.shape[0])
        latents = []
        for level, block in enumerate(self.blocks):
            z, block_ldj, block_log_q = block(z, None if etas is None else etas[level])
            ldj = ldj + block_ldj
            log_q = log_q + block_log_q
            if level < len(self.transitions):
                z, factored = self.transitions[level](z)
                latents.append(factored)
        return latents + [z], ldj, log_q

    def decode(self, latents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Latents (as from `encode`; None = draw that factored-out half) -> y in [0, 1]."""
        z = latents[-1]
        for level in reversed(range(len(self.blocks))):
            if level < len(self.transitions):
                z = self.transitions[level].inverse(z, latents[level])
            z = self.blocks[level].inverse(z)
        return unsqueeze2d(z) + 0.5

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; loc, exp(log_scale)^2) with one loc and log-scale per channel -> [N]."""
        eps = (z - self.base_loc) * torch.exp(-self.base_log_scale)
        return (std_normal_log_prob(eps)
                - self.base_log_scale.sum() * (z.shape[2] * z.shape[3]))

    # ---- public API -----------------------------------------------------------------------

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic lower bound of ln P(x) in nats, x RGB 0..255 [N, 3, h, w] -> [N].

        Uniform dequantisation y = (x + u) / 256; the cross-unit noises make it a variational
        bound as in DenseFlow. The first call in training mode initialises ActNorm.
        """
        x = self._check_images(x)
        with _no_autocast(x):
            y = (x + torch.rand_like(x)) / self.num_bins
            latents, ldj, log_q = self.encode(y)
            log_p = self.base_log_prob(latents[-1]) + ldj - log_q
            for factored in latents[:-1]:
                log_p = log_p + std_normal_log_prob(factored)
            return log_p - x[0].numel() * math.log(self.num_bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`log_prob(x)`, so DistributedDataParallel can wrap the MLE step."""
        return self.log_prob(x)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 P(x) per colour value -> [N] (the MLE objective in bits/dim)."""
        return -self.log_prob(x) / (x[0].numel() * math.log(2.0))

    def sample(self, n: int, h: int, w: int, differentiable: bool = False) -> torch.Tensor:
        """n samples [n, 3, h, w] in [0, 255] (continuous values).

        `differentiable=True` keeps the graph, so a loss on the samples reaches the flow's
        parameters (all but the noise networks, which sampling does not use); otherwise the
        sampling runs under no_grad.
        """
        if int(n) != n or n < 1:
            raise DataError(f'DenseFlow.sample needs a positive number of samples; got {n!r}.')
        self._check_size(h, w, 'sample')
        grad = contextlib.nullcontext() if differentiable else torch.no_grad()
        with grad, _no_autocast(self.base_loc):
            shapes = self.latent_shapes(int(n), h, w)
            loc, log_scale = self.base_loc, self.base_log_scale
            base = torch.randn(shapes[-1], dtype=loc.dtype, device=loc.device)
            y = self.decode([None] * (len(shapes) - 1) + [loc + torch.exp(log_scale) * base])
            return _straight_through_clamp(self.num_bins * y, 0.0, self.num_bins - 1.0)


def _no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The flow runs in its own dtype (float32), also inside an AMP region (DESIGN.md traps)."""
    return torch.autocast(device_type=t.device.type, enabled=False)
