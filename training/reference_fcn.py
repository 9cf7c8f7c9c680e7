"""The speed reference of issue 5 §4: a plain ResNet-18 FCN exported to ONNX.

ResNet-18 (torchvision) to its stride-32 features -> 1x1 classifier -> bilinear upsampling to
the input size -> argmax. It takes the artifact's input (float32 RGB 0..255 `[N, 3, H, W]`,
normalised inside like SwiftNet) and returns int32 labels `[N, H, W]`, so timing it in the same
runtime as an artifact tells how close the artifact is to what the hardware does for a ResNet-18.
The weights are random: only its speed is used.
"""

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torchvision

from anomaly_seg_node.errors import ArtifactError, ConfigError
from training.networks.swiftnet import IMAGENET_MEAN, IMAGENET_STD

REFERENCE_NAME = 'resnet18_fcn'


class ResNet18FCN(nn.Module):
    """ResNet-18 trunk -> 1x1 conv (512 -> K) at stride 32 -> bilinear to input -> argmax."""

    def __init__(self, num_classes: int = 12) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f'num_classes must be a positive int, got {num_classes!r}')
        tv = torchvision.models.resnet18(weights=None)
        self.trunk = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2,
                                   tv.layer3, tv.layer4)
        self.classifier = nn.Conv2d(512, num_classes, 1)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.trunk((image - self.mean) / self.std))  # [N, K, H/32, W/32]
        logits = F.interpolate(logits, size=image.shape[-2:], mode='bilinear',
                               align_corners=False)
        return logits.argmax(dim=1).to(torch.int32)  # [N, H, W]


def export_reference_fcn(path: str | os.PathLike, size: tuple[int, int], batch: int = 1,
                         num_classes: int = 12, seed: int = 0) -> Path:
    """Write the reference FCN as ONNX (input 'image', output 'labels') at one static size.

    Checked with onnx.checker and against eager torch on one random image (labels must agree
    on >= 99.9% of pixels), so a broken reference never produces a ratio.
    """
    import onnx
    import onnxruntime

    height, width = (int(v) for v in size)
    if height < 32 or width < 32 or batch < 1:
        raise ConfigError(f'the reference FCN needs a size of at least 32x32 and batch >= 1, '
                          f'got {height}x{width}, batch {batch}')
    torch.manual_seed(seed)
    model = ResNet18FCN(num_classes).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; a wider classifier makes argmax well defined.
        model.classifier.weight.mul_(16.0)
    example = torch.zeros(batch, 3, height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False,
                          input_names=['image'], output_names=['labels'], verbose=False)
        onnx.checker.check_model(str(tmp), full_check=True)
        rng = np.random.default_rng(seed)
        image = rng.uniform(0, 255, (batch, 3, height, width)).astype(np.float32)
        session = onnxruntime.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
        (labels,) = session.run(['labels'], {'image': image})
        with torch.no_grad():
            eager = model(torch.from_numpy(image)).numpy()
        agreement = float(np.mean(labels == eager))
        if labels.dtype != np.int32 or labels.shape != eager.shape or agreement < 0.999:
            raise ArtifactError(
                f'the reference FCN in ONNX Runtime disagrees with eager torch ({labels.dtype} '
                f'{labels.shape}, labels agree on {agreement:.4%}); check the onnx/onnxruntime '
                'versions')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
