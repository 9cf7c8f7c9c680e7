"""Invertible building blocks of the anomaly-detection DenseFlow (methods.md §4).

Every bijection maps `x -> (z, ldj)`, ldj `[N]` = log|det dz/dx| per sample, and has
`inverse(z) -> x`. Names follow the DenseFlow paper (Grcić et al., NeurIPS 2021): glow-like
steps inside a unit, cross-unit coupling (noise networks g_i) between units.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOG_2PI = math.log(2.0 * math.pi)


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Log-density of N(0, I) summed over all but the batch dimension -> `[N]`."""
    return (-0.5 * (x * x + LOG_2PI)).flatten(1).sum(1)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2]; output channel 4c + 2dy + dx (RealNVP order)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze2d(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `squeeze2d`: [N, 4C, H, W] -> [N, C, 2H, 2W]."""
    n, c4, h, w = z.shape
    z = z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(n, c4 // 4, 2 * h, 2 * w)


def _zeros_ldj(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0])


class Squeeze2d(nn.Module):
    """Space-to-depth 2x2 (volume preserving)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2d(x), _zeros_ldj(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return unsqueeze2d(z)


class ActNorm2d(nn.Module):
    """Per-channel affine z = (x - shift) exp(-log_scale), data-dependent init on the first batch.

    The init runs on the first forward in training mode: shift = channel mean, log_scale = log(std
    + eps), so z starts with zero mean and unit variance. `initialized` is a buffer, so a loaded
    checkpoint is never re-initialised.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer('initialized', torch.tensor(False))

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        values = x.transpose(0, 1).flatten(1)  # [C, N*H*W]
        if values.shape[1] < 2:
            return  # no spread to measure on one value per channel; wait for a larger batch
        self.shift.copy_(values.mean(1).view_as(self.shift))
        std = values.std(1, correction=0).view_as(self.log_scale)
        self.log_scale.copy_(torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self._data_init(x)
        z = (x - self.shift) * torch.exp(-self.log_scale)
        ldj = -self.log_scale.sum() * (x.shape[2] * x.shape[3])
        return z, ldj.expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.shift + z * torch.exp(self.log_scale)


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution with a full C x C matrix W (Glow), orthogonal init."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels))
        nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.weight.shape[0]
        z = F.conv2d(x, self.weight.view(c, c, 1, 1))
        ldj = torch.linalg.slogdet(self.weight)[1] * (x.shape[2] * x.shape[3])
        return z, ldj.expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0]
        return F.conv2d(z, torch.linalg.inv(self.weight).view(c, c, 1, 1))


class SwitchChannels(nn.Module):
    """Swap the two channel halves, so the next coupling transforms the other half."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = (x.shape[1] + 1) // 2
        return torch.cat([x[:, k:], x[:, :k]], 1), _zeros_ldj(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        m = z.shape[1] // 2
        return torch.cat([z[:, m:], z[:, :m]], 1)


class DenseLayer(nn.Module):
    """1x1 c->c, ReLU, 3x3 c->growth, ReLU; the output is appended to the input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv3 = nn.Conv2d(channels, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv3(F.relu(self.conv1(x))))
        return torch.cat([x, h], 1)


class GatedConv1x1(nn.Module):
    """1x1 conv to 3*out channels (a, b, c) -> a + b * sigmoid(c)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3 * out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.conv(x).chunk(3, 1)
        return a + b * torch.sigmoid(c)


class ResidualDenseBlock(nn.Module):
    """`depth` dense layers, a gated 1x1 back to `channels`, added to the block input."""

    def __init__(self, channels: int, depth: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DenseLayer(channels + i * growth, growth)
                                      for i in range(depth)])
        self.gate = GatedConv1x1(channels + depth * growth, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate(self.layers(x))


class DenseCouplingNet(nn.Module):
    """Coupling network DN: 1x1 in->mid, residual dense block, zero-init 1x1 mid->out.

    The zero-init output makes every coupling the identity at initialisation. With
    `checkpointing`, activations are recomputed in backward (training memory for big patches).
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, depth: int,
                 growth: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, mid_channels, 1)
        self.dense = ResidualDenseBlock(mid_channels, depth, growth)
        self.conv_out = nn.Conv2d(mid_channels, out_channels, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.checkpointing = checkpointing

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.dense(self.conv_in(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class AffineCoupling(nn.Module):
    """z1 = x1, z2 = shift + exp(log s) x2 with (raw, shift) = DN(x1), log s = 2 tanh(raw / 2).

    x1 is the first ceil(C/2) channels. DN's output is read pairwise per channel j of x2:
    channel 2j = raw log-scale, 2j+1 = shift (the reference's "sequential" layout).
    """

    def __init__(self, channels: int, mid_channels: int, depth: int, growth: int,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.out_channels = channels // 2
        self.cond_channels = channels - self.out_channels
        self.net = DenseCouplingNet(self.cond_channels, 2 * self.out_channels, mid_channels,
                                    depth, growth, checkpointing)

    def _params(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x1.shape
        p = self.net(x1).view(n, self.out_channels, 2, h, w)
        return 2.0 * torch.tanh(p[:, :, 0] / 2.0), p[:, :, 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, :self.cond_channels], x[:, self.cond_channels:]
        log_s, shift = self._params(x1)
        z2 = shift + torch.exp(log_s) * x2
        return torch.cat([x1, z2], 1), log_s.flatten(1).sum(1)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[:, :self.cond_channels], z[:, self.cond_channels:]
        log_s, shift = self._params(z1)
        return torch.cat([z1, (z2 - shift) * torch.exp(-log_s)], 1)


class GlowStep(nn.Module):
    """One intra-unit step: ActNorm -> invertible 1x1 conv -> affine coupling -> switch."""

    def __init__(self, channels: int, mid_channels: int, depth: int, growth: int,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.steps = nn.ModuleList([
            ActNorm2d(channels), InvConv1x1(channels),
            AffineCoupling(channels, mid_channels, depth, growth, checkpointing),
            SwitchChannels()])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ldj = _zeros_ldj(x)
        for step in self.steps:
            x, step_ldj = step(x)
            ldj = ldj + step_ldj
        return x, ldj

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


class NoiseNet(nn.Module):
    """Noise network g_i: 3x3 c->4c, ReLU, zero-init 1x1 4c->2*growth -> (mu, log sigma)."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(in_channels, 4 * in_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(4 * in_channels, 2 * growth_rate, 1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, u = self.conv1(F.relu(self.conv3(x))).chunk(2, 1)
        return mu, 2.0 * torch.tanh(u / 2.0)


def noise_net_widths(in_channels: int, num_units: int, growth_rate: int) -> list[int]:
    """Input widths of g_1..g_{U-1}: unit i sees the inputs of units 0..i-1 (before noise)."""
    unit_inputs = [in_channels] + [in_channels + j * growth_rate for j in range(num_units - 1)]
    return [sum(unit_inputs[:i]) for i in range(1, num_units)]


class InvertibleDenseBlock(nn.Module):
    """A dense block of `num_units` units; before unit i > 0, cross-unit coupling appends
    eta_hat = mu + sigma * eta (eta ~ N(0, I), `growth_rate` channels) with (mu, log sigma) =
    g_i(inputs of all previous units). Channels grow from C to C + (U-1) * growth_rate.

    `forward(x, etas)` returns (z, ldj, log_q): ldj includes sum log sigma, log_q = log N(eta),
    so log p(x) >= log p(z) + ldj - log_q (variational augmentation). With `etas` given, the
    map (x, etas) -> z is a bijection whose log|det| is ldj.
    """

    def __init__(self, in_channels: int, num_units: int, steps_per_unit: int, growth_rate: int,
                 mid_channels: int, depth: int, growth: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.units = nn.ModuleList([
            nn.ModuleList([GlowStep(in_channels + i * growth_rate, mid_channels, depth, growth,
                                    checkpointing) for _ in range(steps_per_unit)])
            for i in range(num_units)])
        self.noise_nets = nn.ModuleList([
            NoiseNet(width, growth_rate)
            for width in noise_net_widths(in_channels, num_units, growth_rate)])

    @property
    def out_channels(self) -> int:
        return self.in_channels + (len(self.units) - 1) * self.growth_rate

    def noise_shapes(self, n: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the etas `forward` draws for an input of spatial size h x w."""
        return [(n, self.growth_rate, h, w)] * len(self.noise_nets)

    def forward(self, x: torch.Tensor, etas: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        ldj = _zeros_ldj(x)
        log_q = _zeros_ldj(x)
        unit_inputs = []  # inputs of the units so far, before their noise channels
        for i, unit in enumerate(self.units):
            if i > 0:
                mu, log_sigma = self.noise_nets[i - 1](torch.cat(unit_inputs, 1))
                eta = (torch.randn(n, self.growth_rate, h, w, dtype=x.dtype, device=x.device)
                       if etas is None else etas[i - 1])
                log_q = log_q + std_normal_log_prob(eta)
                ldj = ldj + log_sigma.flatten(1).sum(1)
                unit_inputs.append(x)
                x = torch.cat([x, mu + torch.exp(log_sigma) * eta], 1)
            else:
                unit_inputs.append(x)
            for step in unit:
                x, step_ldj = step(x)
                ldj = ldj + step_ldj
        return x, ldj, log_q

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Invert the units from the last; the appended noise channels are dropped."""
        for i in reversed(range(len(self.units))):
            for step in reversed(self.units[i]):
                z = step.inverse(z)
            if i > 0:
                z = z[:, :-self.growth_rate]
        return z


class Transition(nn.Module):
    """Squeeze 2x2, keep the first half of the channels, factor out the second half.

    `forward(x) -> (kept, factored)`; the factored half is scored under N(0, I) by the flow.
    `inverse(kept, factored=None)` draws a fresh N(0, I) half when none is given.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2d(x).chunk(2, 1)

    def inverse(self, kept: torch.Tensor, factored: torch.Tensor | None = None) -> torch.Tensor:
        if factored is None:
            factored = torch.randn_like(kept)
        return unsqueeze2d(torch.cat([kept, factored], 1))
