"""SwiftNet-RN18 (methods.md §1): shapes, parameter counts, trunk skips, weights loading."""

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError
from training.networks.swiftnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_URL_FILE,
    SwiftNet,
    build_swiftnet,
    spp_grid,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope='module')
def model() -> SwiftNet:
    torch.manual_seed(0)
    return SwiftNet(12, outlier_head=True)


def test_parameter_counts(model):
    assert n_params(SwiftNet(12)) == 11_796_168
    assert n_params(model) == 11_796_168 + 514
    assert n_params(SwiftNet(19)) == 11_797_071
    assert n_params(model.encoder) == 11_176_512
    assert n_params(model.spp) == 116_476
    assert n_params(model.upsample) == 501_376
    assert n_params(model.class_head) == 256 + 129 * 12
    assert (sum(p.numel() for p in model.encoder_parameters())
            + sum(p.numel() for p in model.random_init_parameters())) == n_params(model)


@pytest.mark.parametrize(('h', 'w'), [(64, 64), (96, 160), (100, 130)])
def test_output_shapes_eval(model, h, w):
    model.eval()
    with torch.no_grad():
        out = model(image(2, h, w))
        features = model.forward_features(image(1, h, w))
    assert set(out) == {'logits', 'outlier_logits'}
    assert out['logits'].shape == (2, 12, h, w)
    assert out['outlier_logits'].shape == (2, 2, h, w)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert features.shape == (1, 128, math.ceil(h / 4), math.ceil(w / 4))


def test_train_mode_gradient_reaches_every_parameter(model):
    model.train()
    model.zero_grad()
    before = model.spp.bottleneck.norm.running_mean.clone()
    out = model(image(2, 96, 160))
    assert out['logits'].shape == (2, 12, 96, 160)
    assert out['outlier_logits'].shape == (2, 2, 96, 160)
    (out['logits'].logsumexp(1).mean() + out['outlier_logits'].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    # SPP batch norms use momentum 0.005, the rest 0.1.
    assert model.spp.bottleneck.norm.momentum == 0.005
    assert model.upsample[0].blend_conv.norm.momentum == 0.1
    assert not torch.equal(before, model.spp.bottleneck.norm.running_mean)
    model.eval()


def test_720x1280(model):
    model.eval()
    with torch.no_grad():
        out = model(image(1, 720, 1280))
    assert out['logits'].shape == (1, 12, 720, 1280)
    assert out['outlier_logits'].shape == (1, 2, 720, 1280)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_spp_grids_follow_the_aspect_ratio():
    # 720x1280 -> stride-32 map 23x40 (methods.md §1)
    assert [spp_grid(23, 40, g) for g in (8, 4, 2)] == [(8, 14), (4, 7), (2, 3)]
    assert [spp_grid(2, 2, g) for g in (8, 4, 2)] == [(8, 8), (4, 4), (2, 2)]
    assert spp_grid(40, 3, 2) == (2, 1)


def test_without_outlier_head():
    net = SwiftNet(5).eval()
    with torch.no_grad():
        out = net(image(1, 64, 96))
    assert set(out) == {'logits'} and out['logits'].shape == (1, 5, 64, 96)
    assert not net.has_outlier_head


def test_trunk_skips_are_pre_relu_sums(model):
    """relu(skip) equals torchvision's own stage output; the skips keep negative values."""
    model.eval()
    x = image(1, 64, 64, seed=1)
    xn = (x - model.mean) / model.std
    enc = model.encoder
    with torch.no_grad():
        skips = enc(xn)
        y = enc.maxpool(enc.relu(enc.bn1(enc.conv1(xn))))
        for skip, layer, c, stride in zip(
                skips, (enc.layer1, enc.layer2, enc.layer3, enc.layer4), (64, 128, 256, 512),
                (4, 8, 16, 32), strict=True):
            y = layer(y)  # torchvision's BasicBlock.forward
            assert skip.shape == (1, c, 64 // stride, 64 // stride)
            torch.testing.assert_close(F.relu(skip), y)
            assert (skip < 0).any()


def test_normalisation_inside_the_model():
    torch.manual_seed(0)
    a = SwiftNet(3, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0)).eval()
    b = SwiftNet(3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    assert 'mean' not in a.state_dict()  # the config holds them
    b.load_state_dict(a.state_dict())
    x = image(1, 64, 64)
    x_copy = x.clone()
    with torch.no_grad():
        out_a = a(x)['logits']
        out_b = b((x - a.mean) / a.std)['logits']
    torch.testing.assert_close(out_a, out_b)
    assert torch.equal(x, x_copy)  # the input is not normalised in place
    net = SwiftNet(3)
    torch.testing.assert_close(net.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(net.std.flatten(), torch.tensor(IMAGENET_STD))
    assert net.mean.flatten().tolist() == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert a.config()['mean'] == [10.0, 20.0, 30.0] and a.config()['std'] == [2.0, 4.0, 5.0]


def test_config_rebuilds_the_network(model):
    cfg = model.config()
    assert cfg == {
        'arch': 'swiftnet_rn18', 'num_classes': 12, 'outlier_head': True, 'num_features': 128,
        'spp_grids': [8, 4, 2], 'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD),
    }
    rebuilt = build_swiftnet(cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    x = image(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(ConfigError, match="unknown keys \\['depth'\\]"):
        build_swiftnet({**cfg, 'depth': 34})
    with pytest.raises(ConfigError, match='num_classes is missing'):
        build_swiftnet({'arch': 'swiftnet_rn18'})
    with pytest.raises(ConfigError, match='expected arch'):
        build_swiftnet({**cfg, 'arch': 'resnet50'})


def test_init():
    net = SwiftNet(4, outlier_head=True)
    w = net.upsample[0].blend_conv.conv.weight  # 128 -> 128, 3x3: fan_out = 1152
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.05)
    assert torch.equal(net.class_head.conv.bias, torch.zeros(4))
    assert torch.equal(net.spp.fuse.norm.weight, torch.ones(254))
    assert torch.equal(net.outlier_head.norm.bias, torch.zeros(128))


@pytest.fixture(scope='module')
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # not the init values
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_()
    return tv.state_dict()


def _assert_trunk_holds(net: SwiftNet, state: dict[str, torch.Tensor]) -> None:
    trunk = net.encoder.state_dict()
    assert set(trunk) == {k for k in state if not k.startswith('fc.')}
    for k, v in trunk.items():
        assert torch.equal(v, state[k]), k


def test_pretrained_from_file(tmp_path, resnet18_state):
    state = resnet18_state
    path = tmp_path / 'resnet18.pth'
    torch.save(state, path)
    net = SwiftNet(12, outlier_head=True, pretrained=str(path))
    _assert_trunk_holds(net, state)
    net = SwiftNet(12, pretrained=path)  # a Path works too
    _assert_trunk_holds(net, state)


def test_pretrained_file_errors(tmp_path, resnet18_state):
    state = resnet18_state
    with pytest.raises(ArtifactError, match='does not exist'):
        SwiftNet(3, pretrained=tmp_path / 'nope.pth')
    missing = dict(state)
    del missing['layer4.1.bn2.weight']
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(ArtifactError, match='missing .*layer4.1.bn2.weight'):
        SwiftNet(3, pretrained=tmp_path / 'missing.pth')
    torch.save({**state, 'extra.weight': torch.zeros(1)}, tmp_path / 'extra.pth')
    with pytest.raises(ArtifactError, match='unexpected .*extra.weight'):
        SwiftNet(3, pretrained=tmp_path / 'extra.pth')
    torch.save({**state, 'conv1.weight': torch.zeros(64, 3, 3, 3)}, tmp_path / 'shape.pth')
    with pytest.raises(ArtifactError, match='do not fit the trunk'):
        SwiftNet(3, pretrained=tmp_path / 'shape.pth')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(ArtifactError, match='holds a list'):
        SwiftNet(3, pretrained=tmp_path / 'list.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ArtifactError, match='weights_only=True'):
        SwiftNet(3, pretrained=tmp_path / 'junk.pth')


def test_pretrained_imagenet_from_the_hub_cache(tmp_path, monkeypatch, resnet18_state):
    """pretrained=True goes through torchvision's ResNet18_Weights, which reads the cache."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path))
    state = resnet18_state
    (tmp_path / 'checkpoints').mkdir()
    torch.save(state, tmp_path / 'checkpoints' / IMAGENET_URL_FILE)
    _assert_trunk_holds(SwiftNet(12, pretrained=True), state)


def test_pretrained_imagenet_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(ConfigError, match=f"could not be downloaded.*pretrained='/path/to/"
                                          f'{IMAGENET_URL_FILE}'):
        SwiftNet(12, pretrained=True)


def test_argument_and_input_errors(model):
    with pytest.raises(ConfigError, match='num_classes'):
        SwiftNet(0)
    with pytest.raises(ConfigError, match='pretrained must be'):
        SwiftNet(3, pretrained=3)
    with pytest.raises(ConfigError, match='std > 0'):
        SwiftNet(3, std=(1.0, 0.0, 1.0))
    for bad in (torch.zeros(3, 64, 64), torch.zeros(1, 4, 64, 64),
                torch.zeros(1, 3, 64, 64, dtype=torch.uint8)):
        with pytest.raises(DataError, match=r'float RGB batch \[N, 3, H, W\]'):
            model(bad)
