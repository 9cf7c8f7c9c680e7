"""Negative pasting and the gradient routing of every method (methods.md §2.3, §3.2, §3.3).

Tiny float64 stand-ins with the real contracts: a 2-layer conv segmenter returning
{'logits', 'outlier_logits'} and an affine "flow" with a differentiable `sample` and an exact
`log_prob`. For each variant the flow's gradient from `compute_step` is checked against central
finite differences of the objective the paper routes into it (same seeds, same layout), a
blocked path is checked to contribute exactly zero (bitwise), and the segmenter's gradient is
checked against autograd of its own objective with the patch detached.
"""

from functools import partial
import math

import pytest
import torch
from torch import nn

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import IGNORE_ID
from training.config import Config, NegativesConfig
from training.losses import (
    cls_loss,
    energy_loss,
    jsd_loss,
    mle_bits_per_dim,
    outlier_head_loss,
    void_mask,
)
from training.negatives import (
    crop_at,
    draw_patch_layout,
    paste_ade_negatives,
    paste_patches,
    patch_sides,
)
from training.step import compute_step

K = 4
N, H, W = 2, 24, 32
SEED = 123


class TinySegmenter(nn.Module):
    """conv3x3 -> tanh -> 1x1 class head (+ 1x1 outlier head); smooth, so finite differences
    are accurate."""

    def __init__(self, outlier_head: bool = True) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.cls = nn.Conv2d(6, K, 1)
        self.ood = nn.Conv2d(6, 2, 1) if outlier_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.tanh(self.body(x / 64.0 - 2.0))
        out = {'logits': self.cls(f)}
        if self.ood is not None:
            out['outlier_logits'] = self.ood(f)
        return out


class TinyFlow(nn.Module):
    """x = 128 + 40 (A z + b), z ~ N(0, I) per pixel: exact log_prob, differentiable sample."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = nn.Parameter(torch.eye(3) + 0.2 * torch.randn(3, 3, generator=g))
        self.b = nn.Parameter(0.3 * torch.randn(3, generator=g))

    def sample(self, n: int, h: int, w: int, differentiable: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            z = torch.randn(n, 3, h, w, dtype=self.a.dtype, device=self.a.device)
            y = torch.einsum('ij,njhw->nihw', self.a, z) + self.b[:, None, None]
            return 128.0 + 40.0 * y

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - 128.0) / 40.0 - self.b[:, None, None]
        z = torch.einsum('ij,njhw->nihw', torch.linalg.inv(self.a), y)
        hw = x.shape[2] * x.shape[3]
        log_n = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
        return log_n - hw * torch.linalg.slogdet(self.a)[1] - x[0].numel() * math.log(40.0)


def _cfg(method: str, *overrides: str) -> Config:
    head = 'false' if method in ('nflowjs', 'closed_set', 'flow_pretrain') else 'true'
    return Config().with_overrides([
        f'method={method}', f'model.num_classes={K}', f'model.outlier_head={head}',
        'negatives.min_size=8', 'negatives.max_size=16', 'train.amp=false', *overrides])


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (N, 3, H, W), generator=g).to(torch.float64)
    label = torch.randint(0, K, (N, H, W), generator=g)
    label[:, :3] = IGNORE_ID  # a void band (jitter padding)
    return {'image': image, 'label': label}


def _models(outlier_head: bool = True) -> tuple[TinySegmenter, TinyFlow]:
    torch.manual_seed(1)
    return TinySegmenter(outlier_head).double(), TinyFlow().double()


def _run(cfg: Config, seg: nn.Module | None, flow: nn.Module | None,
         negatives=None) -> dict[str, float]:
    torch.manual_seed(SEED)
    return compute_step(cfg, seg, flow, _batch(), negatives,
                        torch.Generator().manual_seed(SEED))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _pasted_sample(cfg: Config, flow: TinyFlow, differentiable: bool):
    """Replays the step's random draws: layout(s) from the generator, samples from torch's."""
    torch.manual_seed(SEED)
    rng = torch.Generator().manual_seed(SEED)
    batch = _batch()
    layout = draw_patch_layout(cfg.negatives, N, (H, W), rng)
    if cfg.method == 'nf_hybrid_js':  # phase 1's sample and layout come first
        flow.sample(N, layout.h, layout.w)
        layout = draw_patch_layout(cfg.negatives, N, (H, W), rng)
    p = flow.sample(N, layout.h, layout.w, differentiable=differentiable)
    return paste_patches(batch['image'], batch['label'], p, layout)


def _terms(cfg: Config, seg: nn.Module, pasted) -> dict[str, torch.Tensor]:
    out = seg(pasted.image)
    terms = {'cls': cls_loss(out['logits'], pasted.labels),
             'x': energy_loss(out['logits'], pasted.ood_mask),
             'jsd': jsd_loss(out['logits'], pasted.ood_mask)}
    if 'outlier_logits' in out:
        void = void_mask(pasted.labels, pasted.ood_mask) if cfg.loss.ld_ignore_void else None
        terms['d'] = outlier_head_loss(out['outlier_logits'], pasted.ood_mask, void)
    return terms


def _flow_objective(cfg: Config, seg: nn.Module, flow: TinyFlow, routed) -> torch.Tensor:
    """routed(terms) + MLE of the overwritten inlier crop, as a function of the flow."""
    pasted = _pasted_sample(cfg, flow, differentiable=True)
    crop = pasted.inlier_crop
    mle = mle_bits_per_dim(flow.log_prob(crop), crop[0].numel())
    return routed(_terms(cfg, seg, pasted)) + mle


# (parameter index, flat element) of the flow parameters checked by finite differences:
# two entries of A (off-diagonal and diagonal) and two of b.
FD_POINTS = ((0, 1), (0, 4), (1, 0), (1, 2))


def _assert_matches_finite_differences(got: list[torch.Tensor], objective, flow: TinyFlow,
                                       eps: float = 1e-6) -> None:
    """Central differences of objective() at FD_POINTS equal the gradients `got` there."""
    params = list(flow.parameters())
    with torch.no_grad():
        for index, element in FD_POINTS:
            flat = params[index].view(-1)
            old = flat[element].item()
            flat[element] = old + eps
            plus = objective().item()
            flat[element] = old - eps
            minus = objective().item()
            flat[element] = old
            fd = (plus - minus) / (2 * eps)
            assert got[index].view(-1)[element].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


def _autograd_through_sample(objective, flow: TinyFlow) -> list[torch.Tensor]:
    return list(torch.autograd.grad(objective(), list(flow.parameters())))


def _mle_only_grads(cfg: Config, flow: TinyFlow) -> list[torch.Tensor]:
    crop = _pasted_sample(cfg, flow, differentiable=False).inlier_crop
    mle = mle_bits_per_dim(flow.log_prob(crop), crop[0].numel())
    return list(torch.autograd.grad(mle, list(flow.parameters())))


def _segmenter_grads(cfg: Config, seg: nn.Module, flow: TinyFlow, objective,
                     first_phase: bool = False) -> list[torch.Tensor]:
    """Autograd of the segmenter objective on the step's (detached) pasted batch."""
    if first_phase:  # NF-Hybrid-JS: S learns on phase 1's layout and sample
        torch.manual_seed(SEED)
        rng = torch.Generator().manual_seed(SEED)
        batch = _batch()
        layout = draw_patch_layout(cfg.negatives, N, (H, W), rng)
        p = flow.sample(N, layout.h, layout.w)
        pasted = paste_patches(batch['image'], batch['label'], p, layout)
    else:
        pasted = _pasted_sample(cfg, flow, differentiable=False)
    loss = objective(_terms(cfg, seg, pasted))
    return list(torch.autograd.grad(loss, list(seg.parameters())))


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-6,
                  atol: float = 1e-9) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _assert_differs(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) > 1e-6


# ---- pasting ----------------------------------------------------------------------------


def test_patch_sides_are_clipped_to_the_crop():
    cfg = NegativesConfig()
    assert patch_sides(cfg, 10_000) == list(range(16, 217, 8))
    assert patch_sides(cfg, 40) == [16, 24, 32, 40]
    with pytest.raises(DataError, match='min_size'):
        patch_sides(cfg, 15)


def test_square_and_rectangular_layouts():
    rng = torch.Generator().manual_seed(0)
    square = NegativesConfig(min_size=8, max_size=32)
    seen = set()
    for _ in range(200):
        lay = draw_patch_layout(square, 3, (24, 40), rng)
        assert lay.h == lay.w and lay.h in (8, 16, 24)
        assert all(0 <= t <= 24 - lay.h for t in lay.tops)
        assert all(0 <= left <= 40 - lay.w for left in lay.lefts)
        seen.add(lay.h)
    assert seen == {8, 16, 24}
    rect = NegativesConfig(square=False, min_size=8, max_size=32)
    shapes = {(lay.h, lay.w) for lay in (draw_patch_layout(rect, 1, (24, 40), rng)
                                         for _ in range(300))}
    assert {h for h, _ in shapes} == {8, 16, 24} and {w for _, w in shapes} == {8, 16, 24, 32}
    assert any(h != w for h, w in shapes)


def test_paste_patches_replaces_the_rectangle_and_keeps_the_overwritten_crop():
    batch = _batch()
    layout = draw_patch_layout(NegativesConfig(min_size=8, max_size=16), N, (H, W),
                               torch.Generator().manual_seed(3))
    patches = torch.full((N, 3, layout.h, layout.w), -1.0, dtype=torch.float64,
                         requires_grad=True)
    out = paste_patches(batch['image'], batch['label'], patches, layout)
    for i in range(N):
        t, left = layout.tops[i], layout.lefts[i]
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[t:t + layout.h, left:left + layout.w] = True
        assert torch.equal(out.ood_mask[i], inside)
        assert (out.image[i][:, inside] == -1).all()
        assert torch.equal(out.image[i][:, ~inside], batch['image'][i][:, ~inside])
        assert (out.labels[i][inside] == IGNORE_ID).all()
        assert torch.equal(out.labels[i][~inside], batch['label'][i][~inside])
        assert torch.equal(out.inlier_crop[i],
                           batch['image'][i, :, t:t + layout.h, left:left + layout.w])
    assert torch.equal(out.inlier_crop, crop_at(batch['image'], layout))
    weights = torch.randn(N, 3, H, W, dtype=torch.float64)
    (out.image * weights).sum().backward()
    for i in range(N):
        t, left = layout.tops[i], layout.lefts[i]
        assert torch.equal(patches.grad[i], weights[i, :, t:t + layout.h, left:left + layout.w])


def _placed(mask: torch.Tensor, top: int, left: int) -> torch.Tensor:
    out = torch.zeros(H, W, dtype=torch.bool)
    out[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
    return out


def test_paste_ade_negatives_replaces_only_masked_pixels():
    batch = _batch()
    g = torch.Generator().manual_seed(4)
    c = 12
    neg = torch.randint(0, 256, (N + 1, 3, c, c), generator=g, dtype=torch.uint8)
    masks = torch.rand(N + 1, c, c, generator=g) < 0.5
    out = paste_ade_negatives(batch['image'], batch['label'], neg, masks,
                              torch.Generator().manual_seed(5))
    for i in range(N):
        # the ood mask is the negative's mask placed at one offset fully inside the crop
        offsets = [(a, b) for a in range(H - c + 1) for b in range(W - c + 1)
                   if torch.equal(_placed(masks[i], a, b), out.ood_mask[i])]
        assert offsets, 'the ood mask is not the negative mask at any in-crop offset'
        a, b = offsets[0]
        m = out.ood_mask[i]
        region = out.image[i, :, a:a + c, b:b + c]
        assert torch.equal(region[:, masks[i]], neg[i][:, masks[i]].double())
        assert torch.equal(out.image[i][:, ~m], batch['image'][i][:, ~m])
        assert (out.labels[i][m] == IGNORE_ID).all()
        assert torch.equal(out.labels[i][~m], batch['label'][i][~m])
    with pytest.raises(DataError, match='ade_crop'):
        paste_ade_negatives(batch['image'], batch['label'],
                            torch.zeros(N, 3, 30, 30, dtype=torch.uint8),
                            torch.ones(N, 30, 30, dtype=torch.bool),
                            torch.Generator())
    with pytest.raises(DataError, match='batch size'):
        paste_ade_negatives(batch['image'], batch['label'], neg[:1], masks[:1],
                            torch.Generator())


# ---- routing ----------------------------------------------------------------------------


def test_nf_hybrid_ldlx_flow_gets_exactly_the_gradient_of_lx_and_ld():
    cfg = _cfg('nf_hybrid_ldlx')
    seg, flow = _models()
    values = _run(cfg, seg, flow)
    assert set(values) == {'cls', 'x', 'd', 'loss', 'flow_routed', 'mle'}
    got = _grads(flow)
    routed = partial(_flow_objective, cfg, seg, flow, lambda t: 0.03 * t['x'] + 0.3 * t['d'])
    _assert_matches_finite_differences(got, routed, flow)
    _assert_close(got, _autograd_through_sample(routed, flow))
    _assert_differs(got, _mle_only_grads(cfg, flow))  # the routed path is open
    naive = _autograd_through_sample(lambda: _flow_objective(
        cfg, seg, flow, lambda t: t['cls'] + 0.03 * t['x'] + 0.3 * t['d']), flow)
    _assert_differs(got, naive)  # what back-propagating L_cls as well would give
    # S learns the full DenseHybrid loss on the pasted batch.
    _assert_close(_grads(seg), _segmenter_grads(
        cfg, seg, flow, lambda t: t['cls'] + 0.03 * t['x'] + 0.3 * t['d']))


def test_nf_hybrid_ldlx_lcls_path_into_the_flow_is_exactly_zero():
    cfg = _cfg('nf_hybrid_ldlx', 'loss.beta_x=0', 'loss.beta_d=0')
    seg, flow = _models()
    _run(cfg, seg, flow)
    _assert_equal(_grads(flow), _mle_only_grads(cfg, flow))


def test_nf_hybrid_ld_flow_gets_only_ld():
    cfg = _cfg('nf_hybrid_ld')
    seg, flow = _models()
    _run(cfg, seg, flow)
    got, seg_got = _grads(flow), _grads(seg)
    routed = partial(_flow_objective, cfg, seg, flow, lambda t: 0.3 * t['d'])
    _assert_matches_finite_differences(got, routed, flow)
    _assert_close(got, _autograd_through_sample(routed, flow))
    _assert_differs(got, _mle_only_grads(cfg, flow))
    # L_x is blocked: changing its weight leaves the flow's gradient bitwise unchanged, while S
    # still learns it.
    seg2, flow2 = _models()
    _run(_cfg('nf_hybrid_ld', 'loss.beta_x=0'), seg2, flow2)
    _assert_equal(_grads(flow2), got)
    _assert_differs(_grads(seg2), seg_got)
    _assert_close(seg_got, _segmenter_grads(
        cfg, seg, flow, lambda t: t['cls'] + 0.03 * t['x'] + 0.3 * t['d']))


def test_nf_hybrid_js_flow_gets_jsd_and_mle_only():
    cfg = _cfg('nf_hybrid_js')
    seg, flow = _models()
    values = _run(cfg, seg, flow)
    assert set(values) == {'cls', 'x', 'd', 'loss', 'jsd', 'flow_routed', 'mle'}
    got, seg_got = _grads(flow), _grads(seg)
    routed = partial(_flow_objective, cfg, seg, flow, lambda t: 0.03 * t['jsd'])
    _assert_matches_finite_differences(got, routed, flow)
    _assert_close(got, _autograd_through_sample(routed, flow))
    _assert_differs(got, _mle_only_grads(cfg, flow))
    # No gradient of L_d or L_x reaches the flow: zero weights there change nothing, bitwise.
    seg2, flow2 = _models()
    _run(_cfg('nf_hybrid_js', 'loss.beta_x=0', 'loss.beta_d=0'), seg2, flow2)
    _assert_equal(_grads(flow2), got)
    # The JSD pass never adds to S's .grad: S's gradient is phase 1's DenseHybrid loss alone.
    seg3, flow3 = _models()
    _run(_cfg('nf_hybrid_js', 'loss.beta_jsd=0'), seg3, flow3)
    _assert_equal(_grads(seg3), seg_got)
    _assert_equal(_grads(flow3), _mle_only_grads(cfg, flow3))
    _assert_close(seg_got, _segmenter_grads(
        cfg, seg, flow, lambda t: t['cls'] + 0.03 * t['x'] + 0.3 * t['d'], first_phase=True))


def test_nf_oodhead_flow_learns_by_mle_only():
    cfg = _cfg('nf_oodhead', 'loss.beta_d=1')
    seg, flow = _models()
    values = _run(cfg, seg, flow)
    assert set(values) == {'cls', 'd', 'loss', 'mle'}
    got = _grads(flow)
    _assert_equal(got, _mle_only_grads(cfg, flow))
    _assert_matches_finite_differences(
        got, lambda: _flow_objective(cfg, seg, flow, lambda t: 0.0 * t['cls']), flow)
    _assert_close(_grads(seg), _segmenter_grads(cfg, seg, flow, lambda t: t['cls'] + t['d']))


def test_nflowjs_jsd_drives_both_and_lcls_stays_out_of_the_flow():
    cfg = _cfg('nflowjs')
    seg, flow = _models(outlier_head=False)
    values = _run(cfg, seg, flow)
    assert set(values) == {'cls', 'jsd', 'loss', 'flow_routed', 'mle'}
    got = _grads(flow)
    routed = partial(_flow_objective, cfg, seg, flow, lambda t: 0.03 * t['jsd'])
    _assert_matches_finite_differences(got, routed, flow)
    _assert_close(got, _autograd_through_sample(routed, flow))
    _assert_differs(got, _mle_only_grads(cfg, flow))
    _assert_close(_grads(seg), _segmenter_grads(
        cfg, seg, flow, lambda t: t['cls'] + 0.03 * t['jsd']))
    seg2, flow2 = _models(outlier_head=False)
    _run(_cfg('nflowjs', 'loss.beta_jsd=0'), seg2, flow2)
    _assert_equal(_grads(flow2), _mle_only_grads(cfg, flow2))


@pytest.mark.parametrize('method', ['nflowjs', 'nf_hybrid_js', 'nf_hybrid_ldlx',
                                    'nf_hybrid_ld', 'nf_oodhead', 'flow_pretrain'])
def test_the_flow_gets_one_backward_call_per_step(method):
    """DDP reduces gradients once per backward: every flow parameter is accumulated once."""
    cfg = _cfg(method)
    seg, flow = _models(outlier_head=method not in ('nflowjs', 'flow_pretrain'))
    calls = []
    for param in flow.parameters():
        param.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    _run(cfg, seg, flow)
    assert len(calls) == len(list(flow.parameters()))


def test_flow_pretrain_is_mle_on_random_inlier_crops():
    cfg = _cfg('flow_pretrain')
    _, flow = _models()
    values = _run(cfg, None, flow)
    assert set(values) == {'mle'}
    rng = torch.Generator().manual_seed(SEED)
    crop = crop_at(_batch()['image'], draw_patch_layout(cfg.negatives, N, (H, W), rng))
    mle = mle_bits_per_dim(flow.log_prob(crop), crop[0].numel())
    assert values['mle'] == pytest.approx(mle.item(), rel=1e-12)
    _assert_close(_grads(flow), list(torch.autograd.grad(mle, list(flow.parameters()))))


@pytest.mark.parametrize('method', ['densehybrid', 'oodhead'])
def test_real_negative_methods_train_the_segmenter_on_pasted_ade_crops(method):
    cfg = _cfg(method, 'loss.beta_d=1' if method == 'oodhead' else 'loss.beta_d=0.3')
    seg, _ = _models()
    g = torch.Generator().manual_seed(9)
    neg = (torch.randint(0, 256, (N, 3, 12, 12), generator=g, dtype=torch.uint8),
           torch.rand(N, 12, 12, generator=g) < 0.5)
    values = _run(cfg, seg, None, neg)
    batch = _batch()
    pasted = paste_ade_negatives(batch['image'], batch['label'], *neg,
                                 torch.Generator().manual_seed(SEED))
    terms = _terms(cfg, seg, pasted)
    if method == 'densehybrid':
        assert set(values) == {'cls', 'x', 'd', 'loss'}
        loss = terms['cls'] + 0.03 * terms['x'] + 0.3 * terms['d']
    else:
        assert set(values) == {'cls', 'd', 'loss'}
        loss = terms['cls'] + terms['d']
    assert values['loss'] == pytest.approx(loss.item(), rel=1e-12)
    _assert_close(_grads(seg), list(torch.autograd.grad(loss, list(seg.parameters()))))
    with pytest.raises(DataError, match='ADE20k'):
        _run(cfg, seg, None)


def test_closed_set_is_plain_cross_entropy():
    cfg = _cfg('closed_set')
    seg, _ = _models(outlier_head=False)
    values = _run(cfg, seg, None)
    batch = _batch()
    loss = cls_loss(seg(batch['image'])['logits'], batch['label'])
    assert values == {'cls': pytest.approx(loss.item()), 'loss': pytest.approx(loss.item())}
    _assert_close(_grads(seg), list(torch.autograd.grad(loss, list(seg.parameters()))))


def test_missing_outlier_head_or_flow_is_a_config_error():
    seg, flow = _models(outlier_head=False)
    with pytest.raises(ConfigError, match='outlier_head'):
        _run(_cfg('nf_hybrid_ldlx'), seg, flow)
    with pytest.raises(ConfigError, match='flow'):
        _run(_cfg('nflowjs'), seg, None)
    with pytest.raises(ValueError, match='torch.Generator'):
        compute_step(_cfg('nflowjs'), seg, flow, _batch(), None, None)


def test_uint8_batches_are_accepted():
    cfg = _cfg('nf_hybrid_ldlx')
    seg, flow = _models()
    seg.float(), flow.float()
    batch = _batch()
    batch['image'] = batch['image'].to(torch.uint8)
    torch.manual_seed(SEED)
    values = compute_step(cfg, seg, flow, batch, None, torch.Generator().manual_seed(SEED))
    assert all(math.isfinite(v) for v in values.values())


def test_real_tiny_denseflow_receives_the_routed_gradient():
    """The same routing with training/networks/flow.py's differentiable sampling (float32)."""
    flow_module = pytest.importorskip('training.networks.flow')

    def step(*overrides: str) -> list[torch.Tensor]:
        torch.manual_seed(2)
        seg, flow = TinySegmenter(), flow_module.DenseFlow.from_preset('tiny')
        _run(_cfg('nf_hybrid_ldlx', 'negatives.max_size=8', *overrides), seg, flow)
        grads = [p.grad for p in flow.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        return grads

    routed = step()
    mle_only = step('loss.beta_x=0', 'loss.beta_d=0')
    _assert_differs(routed, mle_only)


class _RecordingFlow(TinyFlow):
    """TinyFlow that records whether autocast was on when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.autocast_seen: list[bool] = []

    def sample(self, n: int, h: int, w: int, differentiable: bool = False) -> torch.Tensor:
        self.autocast_seen.append(torch.is_autocast_enabled(self.a.device.type))
        return super().sample(n, h, w, differentiable)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast_seen.append(torch.is_autocast_enabled(self.a.device.type))
        assert x.dtype == torch.float32
        return super().log_prob(x)


def test_amp_is_ignored_on_the_cpu():
    cfg = _cfg('nf_hybrid_ldlx', 'train.amp=true')
    seg, flow = TinySegmenter(), _RecordingFlow()
    values = _run(cfg, seg, flow)
    assert all(math.isfinite(v) for v in values.values())
    assert flow.autocast_seen == [False, False]


@pytest.mark.gpu
@pytest.mark.parametrize('method', ['nf_hybrid_ldlx', 'nf_hybrid_js', 'nflowjs'])
def test_amp_on_cuda_keeps_the_flow_in_float32(method):
    cfg = _cfg(method, 'train.amp=true')
    torch.manual_seed(0)
    seg = TinySegmenter(outlier_head=method != 'nflowjs').cuda()
    flow = _RecordingFlow().cuda()
    dtypes = []
    seg.cls.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    scalers = {'segmenter': torch.amp.GradScaler('cuda'), 'flow': torch.amp.GradScaler('cuda')}
    opts = {'segmenter': torch.optim.Adam(seg.parameters(), 1e-3),
            'flow': torch.optim.Adamax(flow.parameters(), 1e-3)}
    batch = {k: v.cuda() for k, v in _batch().items()}
    values = compute_step(cfg, seg, flow, batch, None, torch.Generator().manual_seed(0),
                          scalers)
    assert all(math.isfinite(v) for v in values.values())
    assert dtypes and all(d == torch.float16 for d in dtypes)
    assert flow.autocast_seen and not any(flow.autocast_seen)
    for model in (seg, flow):
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    for name in ('segmenter', 'flow'):
        scalers[name].unscale_(opts[name])
        assert all(torch.isfinite(p.grad).all() for p in opts[name].param_groups[0]['params'])
        scalers[name].step(opts[name])
        scalers[name].update()


@pytest.mark.parametrize('method', ['nf_hybrid_ldlx', 'nf_hybrid_js', 'nf_oodhead'])
def test_each_model_is_scaled_by_its_own_grad_scaler(method):
    """With GradScalers, S's .grad is S's scale times the plain gradient and F's is F's."""
    cfg = _cfg(method)
    seg, flow = _models()
    _run(cfg, seg, flow)
    plain_seg, plain_flow = _grads(seg), _grads(flow)
    seg, flow = _models()
    scalers = {'segmenter': torch.amp.GradScaler('cpu', init_scale=1024.0),
               'flow': torch.amp.GradScaler('cpu', init_scale=64.0)}
    torch.manual_seed(SEED)
    compute_step(cfg, seg, flow, _batch(), None, torch.Generator().manual_seed(SEED), scalers)
    _assert_close(_grads(seg), [1024.0 * g for g in plain_seg], rtol=1e-10, atol=1e-12)
    _assert_close(_grads(flow), [64.0 * g for g in plain_flow], rtol=1e-10, atol=1e-12)
