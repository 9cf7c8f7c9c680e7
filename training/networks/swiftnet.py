"""SwiftNet-RN18, single scale, with the DenseHybrid outlier head (methods.md §1, §2.1).

ResNet-18 trunk (torchvision modules and parameter names) whose stages expose the pre-ReLU
residual sum of their last block -> spatial pyramid pooling on the stride-32 sum -> three
128-channel upsampling modules with lateral skips from the stride-16, 8 and 4 sums -> 1x1 heads
on the stride-4 features. Every decoder unit is pre-activation: BN -> ReLU -> conv.
The network takes RGB 0..255 and normalises inside, so export and deployment share it.
"""

from collections.abc import Iterator, Mapping, Sequence
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
import torchvision

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError

ARCH = 'swiftnet_rn18'
# ImageNet statistics on the 0..255 scale (torchvision's 0..1 values x 255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
TRUNK_CHANNELS = (64, 128, 256, 512)
TRUNK_STRIDES = (4, 8, 16, 32)
SPP_BN_MOMENTUM = 0.01 / 2
IMAGENET_URL_FILE = 'resnet18-f37072fd.pth'


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to `size` (H, W), align_corners False, as everywhere in SwiftNet."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def spp_grid(height: int, width: int, grid: int) -> tuple[int, int]:
    """Pooling grid of one pyramid level for a feature map of height x width.

    The grid keeps the aspect ratio: `grid` rows and round(grid * W / H) columns (at least 1);
    e.g. the 23x40 stride-32 map of a 720x1280 image gives 8x14, 4x7 and 2x3.
    """
    return grid, max(1, round(grid * width / height))


class BNReluConv(nn.Sequential):
    """Pre-activation unit: BatchNorm -> ReLU -> k x k conv (padding k // 2)."""

    def __init__(
        self, in_channels: int, out_channels: int, k: int = 3, bias: bool = False,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.add_module('norm', nn.BatchNorm2d(in_channels, momentum=bn_momentum))
        # In place is safe: the BN output is a fresh tensor.
        self.add_module('relu', nn.ReLU(inplace=True))
        self.add_module(
            'conv', nn.Conv2d(in_channels, out_channels, k, padding=k // 2, bias=bias))


def basic_block_forward(
    block: torchvision.models.resnet.BasicBlock, x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a torchvision BasicBlock and return (ReLU output, pre-ReLU residual sum)."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    pre = out + identity
    # Not in place: `pre` is the lateral skip and must keep its negative values.
    return F.relu(pre), pre


class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 without avgpool/fc; returns the pre-ReLU sum of each stage.

    Submodule names equal torchvision's (conv1, bn1, layer1.0.conv1, ...), so an ImageNet
    state dict without its `fc.*` entries loads with strict key checking.
    """

    channels = TRUNK_CHANNELS
    strides = TRUNK_STRIDES

    def __init__(self) -> None:
        super().__init__()
        tv = torchvision.models.resnet18(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3 = tv.layer1, tv.layer2, tv.layer3
        self.layer4 = tv.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised image [N,3,H,W] -> pre-ReLU sums at strides 4, 8, 16, 32."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        skips = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            pre = x
            for block in layer:
                x, pre = basic_block_forward(block, x)
            skips.append(pre)
        return skips


class SpatialPyramidPooling(nn.Module):
    """SwiftNet's SPP: 1x1 bottleneck, pooled levels on aspect-ratio grids, concat, 1x1 fuse."""

    def __init__(
        self, in_channels: int = 512, bottleneck: int = 128, out_channels: int = 128,
        grids: Sequence[int] = (8, 4, 2), bn_momentum: float = SPP_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.grids = tuple(int(g) for g in grids)
        level_size = bottleneck // len(self.grids)
        self.bottleneck = BNReluConv(in_channels, bottleneck, k=1, bn_momentum=bn_momentum)
        self.levels = nn.ModuleList(
            BNReluConv(bottleneck, level_size, k=1, bn_momentum=bn_momentum)
            for _ in self.grids)
        self.fuse = BNReluConv(
            bottleneck + level_size * len(self.grids), out_channels, k=1,
            bn_momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = self.bottleneck(x)
        levels = [x]
        for grid, level in zip(self.grids, self.levels, strict=True):
            pooled = F.adaptive_avg_pool2d(x, spp_grid(height, width, grid))
            levels.append(upsample(level(pooled), (height, width)))
        return self.fuse(torch.cat(levels, dim=1))


class UpsampleModule(nn.Module):
    """Ladder module: 1x1 on the skip, bilinear upsampling of x to the skip's size, sum, 3x3."""

    def __init__(self, skip_channels: int, channels: int = 128) -> None:
        super().__init__()
        self.skip_conv = BNReluConv(skip_channels, channels, k=1)
        self.blend_conv = BNReluConv(channels, channels, k=3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.skip_conv(skip)
        # The target follows the skip: 1/32 of 720 is not an integer.
        return self.blend_conv(upsample(x, skip.shape[-2:]) + skip)


class SwiftNet(nn.Module):
    """SwiftNet-RN18 segmenter with an optional DenseHybrid outlier head.

    Args:
        num_classes: K, the number of inlier classes.
        outlier_head: add the parallel BN-ReLU-1x1 head (128 -> 2) for P(d_out|x).
        pretrained: False (random init), True (torchvision ImageNet weights; needs them in the
            torch hub cache or a download) or the path of a ResNet-18 state dict file.
        num_features: width of the SPP output and the upsampling path (128).
        spp_grids: pooling grid rows of the used SPP levels (8, 4, 2).
        mean, std: per-channel RGB statistics on the 0..255 scale for the built-in
            normalisation (default ImageNet's).
    """

    def __init__(
        self,
        num_classes: int,
        outlier_head: bool = False,
        pretrained: bool | str | os.PathLike = False,
        *,
        num_features: int = 128,
        spp_grids: Sequence[int] = (8, 4, 2),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        _check_args(num_classes, num_features, spp_grids, mean, std)
        # Read the weights first: a bad file fails before the network is built.
        if pretrained is True:
            trunk_state, source = imagenet_state_dict(), 'torchvision ImageNet'
        elif isinstance(pretrained, (str, os.PathLike)):
            trunk_state, source = read_state_dict(Path(pretrained)), str(pretrained)
        elif pretrained is False:
            trunk_state, source = None, ''
        else:
            raise ConfigError(
                f'pretrained must be False, True or a path to a ResNet-18 state dict, '
                f'got {pretrained!r}')
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.rgb_mean = tuple(float(v) for v in mean)
        self.rgb_std = tuple(float(v) for v in std)
        # Not in the state dict: the config is their one source (checkpoints rebuild from it).
        self.register_buffer(
            'mean', torch.tensor(self.rgb_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            'std', torch.tensor(self.rgb_std).view(1, 3, 1, 1), persistent=False)
        self.encoder = ResNet18Trunk()
        self.spp = SpatialPyramidPooling(
            TRUNK_CHANNELS[-1], num_features, num_features, spp_grids)
        # From stride 32 to stride 4: skips of layer3, layer2, layer1.
        self.upsample = nn.ModuleList(
            UpsampleModule(c, num_features) for c in reversed(TRUNK_CHANNELS[:-1]))
        self.class_head = BNReluConv(num_features, self.num_classes, k=1, bias=True)
        self.outlier_head = (
            BNReluConv(num_features, 2, k=1, bias=True) if outlier_head else None)
        self.reset_parameters()
        if trunk_state is not None:
            load_trunk_state_dict(self.encoder, trunk_state, source)

    @property
    def has_outlier_head(self) -> bool:
        return self.outlier_head is not None

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs with zero bias, BN gamma 1 and beta 0 (as SwiftNet)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 [N,3,H,W] -> decoder features [N,128,ceil(H/4),ceil(W/4)] (stride 4)."""
        _check_image(x)
        skips = self.encoder((x - self.mean) / self.std)
        f = self.spp(skips[-1])
        for up, skip in zip(self.upsample, reversed(skips[:-1]), strict=True):
            f = up(f, skip)
        return f

    def forward_heads(
        self, features: torch.Tensor, size: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Heads on stride-4 features; logits resized to `size` (H, W) unless it is None."""
        out = {'logits': self.class_head(features)}
        if self.outlier_head is not None:
            out['outlier_logits'] = self.outlier_head(features)
        if size is not None:
            out = {k: upsample(v, size) for k, v in out.items()}
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """RGB 0..255 [N,3,H,W] -> {'logits': [N,K,H,W], 'outlier_logits': [N,2,H,W]}.

        Both are bilinearly upsampled to the input size; 'outlier_logits' only with the head.
        """
        return self.forward_heads(self.forward_features(x), x.shape[-2:])

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The ImageNet-initialised trunk (SwiftNet trains it with lr / 4)."""
        return self.encoder.parameters()

    def random_init_parameters(self) -> Iterator[nn.Parameter]:
        """SPP, upsampling path and heads."""
        for name, p in self.named_parameters():
            if not name.startswith('encoder.'):
                yield p

    def config(self) -> dict[str, Any]:
        """Plain dict that rebuilds this network with `build_swiftnet` (weights not included)."""
        return {
            'arch': ARCH,
            'num_classes': self.num_classes,
            'outlier_head': self.has_outlier_head,
            'num_features': self.num_features,
            'spp_grids': list(self.spp.grids),
            'mean': list(self.rgb_mean),
            'std': list(self.rgb_std),
        }


def build_swiftnet(
    cfg: Mapping[str, Any], pretrained: bool | str | os.PathLike = False,
) -> SwiftNet:
    """Rebuild a SwiftNet from `SwiftNet.config()` (checkpoints, sidecars)."""
    cfg = dict(cfg)
    arch = cfg.pop('arch', ARCH)
    if arch != ARCH:
        raise ConfigError(f'network config: expected arch {ARCH!r}, found {arch!r}')
    allowed = {'num_classes', 'outlier_head', 'num_features', 'spp_grids', 'mean', 'std'}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(
            f'network config: unknown keys {unknown}; allowed keys are {sorted(allowed)} '
            '(remove the others)')
    if 'num_classes' not in cfg:
        raise ConfigError('network config: num_classes is missing; add num_classes: K')
    num_classes = cfg.pop('num_classes')
    outlier_head = bool(cfg.pop('outlier_head', False))
    return SwiftNet(num_classes, outlier_head, pretrained, **cfg)


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's ResNet18_Weights.IMAGENET1K_V1 (hub cache, else a download)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except OSError as e:  # URLError and socket errors are OSErrors
        raise ConfigError(
            f'pretrained=True: the torchvision ImageNet ResNet-18 weights ({weights.url}) are '
            f'not in the torch hub cache and could not be downloaded (this machine may have no '
            f'network): {e}. Copy {IMAGENET_URL_FILE} from a machine that has it and pass '
            f"pretrained='/path/to/{IMAGENET_URL_FILE}', or put it in "
            f'{torch.hub.get_dir()}/checkpoints/') from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (name -> tensor) from a file, loaded with weights_only=True."""
    if not path.is_file():
        raise ArtifactError(
            f'pretrained weights file {path} does not exist; pass the path of a torchvision '
            f'ResNet-18 state dict (e.g. {IMAGENET_URL_FILE}) or pretrained=False')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or pickled files
        raise ArtifactError(
            f'pretrained weights file {path} could not be read as a state dict with '
            f'weights_only=True ({type(e).__name__}: {e}); save it with '
            'torch.save(model.state_dict(), path)') from e
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ArtifactError(
            f'pretrained weights file {path} holds a {type(state).__name__}, not a state dict '
            'of name -> tensor; save it with torch.save(resnet18.state_dict(), path)')
    return dict(state)


def load_trunk_state_dict(
    trunk: ResNet18Trunk, state: Mapping[str, torch.Tensor], source: str,
) -> None:
    """Load a torchvision ResNet-18 state dict into the trunk: fc ignored, all else strict."""
    state = {k: v for k, v in state.items() if not k.startswith('fc.')}
    try:
        result = trunk.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ArtifactError(
            f'ResNet-18 weights from {source} do not fit the trunk: {e}; pass a torchvision '
            'resnet18 state dict') from e
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(
            f'ResNet-18 weights from {source} do not match torchvision resnet18: missing '
            f'{_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)}; pass a '
            'torchvision resnet18 state dict (keys conv1.weight, bn1.*, layer1.0.conv1.weight, '
            '...; fc.* is ignored)')


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    more = f' (+{len(keys) - n} more)' if len(keys) > n else ''
    return f'{keys[:n]}{more}'


def _check_args(
    num_classes: int, num_features: int, spp_grids: Sequence[int], mean: Sequence[float],
    std: Sequence[float],
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f'num_classes must be a positive int, got {num_classes!r}')
    if len(spp_grids) < 1 or any(int(g) < 1 for g in spp_grids):
        raise ConfigError(f'spp_grids must be positive ints, got {spp_grids!r}')
    if not isinstance(num_features, int) or num_features < len(spp_grids):
        # Each SPP level gets num_features // len(spp_grids) channels.
        raise ConfigError(
            f'num_features must be an int >= len(spp_grids) = {len(spp_grids)}, '
            f'got {num_features!r}')
    if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
        raise ConfigError(
            f'mean and std must be 3 RGB values on the 0..255 scale with std > 0, '
            f'got mean={mean!r}, std={std!r}')


def _check_image(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise DataError(
            f'SwiftNet expects a float RGB batch [N, 3, H, W] on the 0..255 scale, got '
            f'{x.dtype} {list(x.shape)}; convert with image.permute(2, 0, 1)[None].float()')
