"""Known answers for the losses of training/losses.py (methods.md §2.2, §3.1)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly_seg_node.labels import IGNORE_ID
from training.config import LossConfig
from training.losses import (
    cls_loss,
    energy_loss,
    flow_routed_loss,
    jsd_loss,
    jsd_to_uniform,
    mle_bits_per_dim,
    outlier_head_loss,
    segmenter_loss,
    segmenter_terms,
    void_mask,
)


def _batch(seed: int = 0, n: int = 2, k: int = 5, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE_ID
    ood = torch.rand(n, h, w, generator=g) < 0.3
    labels[ood] = IGNORE_ID
    return logits, labels, ood


def _jsd_reference(logits: np.ndarray) -> np.ndarray:
    """JSD(softmax || U) per pixel straight from the definition, logits [K, P] -> [P]."""
    p = np.exp(logits - logits.max(axis=0))
    p /= p.sum(axis=0)
    u = np.full_like(p, 1.0 / p.shape[0])
    m = (p + u) / 2
    with np.errstate(divide='ignore', invalid='ignore'):
        kl_pm = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=0)
    kl_um = (u * np.log(u / m)).sum(axis=0)
    return 0.5 * kl_pm + 0.5 * kl_um


def test_cls_loss_equals_cross_entropy_with_ignore():
    logits, labels, _ = _batch()
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_ID)
    torch.testing.assert_close(cls_loss(logits, labels), expected, rtol=1e-12, atol=1e-12)


def test_cls_loss_is_zero_not_nan_when_every_pixel_is_ignored():
    logits, labels, _ = _batch()
    loss = cls_loss(logits.requires_grad_(), torch.full_like(labels, IGNORE_ID))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_energy_loss_is_mean_logsumexp_over_pasted_pixels():
    logits, _, ood = _batch(1)
    values = []
    for n, i, j in ood.nonzero().tolist():
        values.append(math.log(sum(math.exp(v) for v in logits[n, :, i, j].tolist())))
    assert energy_loss(logits, ood).item() == pytest.approx(sum(values) / len(values), rel=1e-12)


def test_energy_loss_is_zero_without_pasted_pixels():
    logits, _, ood = _batch(2)
    assert energy_loss(logits, torch.zeros_like(ood)).item() == 0.0


def test_jsd_is_zero_for_uniform_predictions():
    logits = torch.full((2, 7, 4, 4), 3.25, dtype=torch.float64)
    assert torch.allclose(jsd_to_uniform(logits), torch.zeros(2, 4, 4, dtype=torch.float64),
                          atol=1e-15)
    assert jsd_loss(logits, torch.ones(2, 4, 4, dtype=torch.bool)).abs().item() < 1e-15


def test_jsd_matches_the_definition_and_is_bounded_by_ln2():
    logits, _, _ = _batch(3)
    ours = jsd_to_uniform(logits).reshape(-1)  # pixels in (n, h, w) order
    ref = _jsd_reference(logits.permute(1, 0, 2, 3).reshape(logits.shape[1], -1).numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-14)
    assert ours.min() >= 0 and ours.max() <= math.log(2)


def test_jsd_of_a_one_hot_prediction_approaches_ln2_with_many_classes():
    k = 10000
    logits = torch.zeros(1, k, 1, 1, dtype=torch.float64)
    logits[0, 0] = 1e4
    jsd = jsd_to_uniform(logits).item()
    assert math.log(2) - 1e-2 < jsd <= math.log(2)
    assert jsd == pytest.approx(_jsd_reference(logits[0, :, 0].numpy()[:, None])[0], rel=1e-10)


def test_jsd_loss_divides_by_the_number_of_pasted_pixels():
    logits, _, ood = _batch(4)
    per_pixel = jsd_to_uniform(logits)
    expected = per_pixel[ood].sum() / ood.sum()
    torch.testing.assert_close(jsd_loss(logits, ood), expected, rtol=1e-12, atol=0)


def test_outlier_head_loss_over_all_pixels_and_without_void():
    g = torch.Generator().manual_seed(5)
    head = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    _, labels, ood = _batch(5)
    all_pixels = F.cross_entropy(head, ood.long())
    torch.testing.assert_close(outlier_head_loss(head, ood), all_pixels, rtol=1e-12, atol=0)
    void = void_mask(labels, ood)
    assert not (void & ood).any() and void.any()
    keep = ~void
    per_pixel = F.cross_entropy(head, ood.long(), reduction='none')
    torch.testing.assert_close(outlier_head_loss(head, ood, void), per_pixel[keep].mean(),
                               rtol=1e-12, atol=0)


def test_void_mask_is_ignored_but_not_pasted():
    labels = torch.tensor([[[0, IGNORE_ID, IGNORE_ID, 3]]])
    ood = torch.tensor([[[False, False, True, False]]])
    assert void_mask(labels, ood).tolist() == [[[False, True, False, False]]]


def test_mle_bits_per_dim_known_answer():
    dims = 3 * 8 * 8
    log_prob = torch.tensor([-dims * math.log(2) * 5.0, -dims * math.log(2) * 7.0],
                            dtype=torch.float64)
    assert mle_bits_per_dim(log_prob, dims).item() == pytest.approx(6.0, rel=1e-12)
    with pytest.raises(ValueError, match='dims'):
        mle_bits_per_dim(log_prob, 0)


def test_half_precision_logits_give_float32_losses():
    logits, labels, ood = _batch(6)
    half = logits.to(torch.bfloat16)
    assert cls_loss(half, labels).dtype == torch.float32
    assert energy_loss(half, ood).dtype == torch.float32
    assert jsd_loss(half, ood).dtype == torch.float32


def _terms(method: str, cfg: LossConfig):
    logits, labels, ood = _batch(7)
    g = torch.Generator().manual_seed(8)
    out = {'logits': logits, 'outlier_logits': torch.randn(2, 2, 6, 7, generator=g,
                                                           dtype=torch.float64)}
    return segmenter_terms(method, out, labels, ood, cfg)


def test_segmenter_loss_weights_per_method():
    cfg = LossConfig(beta_x=0.03, beta_d=0.3, beta_jsd=0.03)
    for method in ('densehybrid', 'nf_hybrid_js', 'nf_hybrid_ldlx', 'nf_hybrid_ld'):
        t = _terms(method, cfg)
        assert set(t) == {'cls', 'x', 'd'}
        expected = t['cls'] + 0.03 * t['x'] + 0.3 * t['d']
        torch.testing.assert_close(segmenter_loss(method, t, cfg), expected)
    ood_cfg = LossConfig(beta_d=1.0)
    for method in ('oodhead', 'nf_oodhead'):
        t = _terms(method, ood_cfg)
        assert set(t) == {'cls', 'd'}
        torch.testing.assert_close(segmenter_loss(method, t, ood_cfg), t['cls'] + t['d'])
    t = _terms('nflowjs', cfg)
    assert set(t) == {'cls', 'jsd'}
    torch.testing.assert_close(segmenter_loss('nflowjs', t, cfg), t['cls'] + 0.03 * t['jsd'])
    t = _terms('closed_set', cfg)
    assert set(t) == {'cls'}
    torch.testing.assert_close(segmenter_loss('closed_set', t, cfg), t['cls'])


def test_ld_ignore_void_switches_the_outlier_loss():
    on = _terms('densehybrid', LossConfig(ld_ignore_void=True))['d']
    off = _terms('densehybrid', LossConfig(ld_ignore_void=False))['d']
    assert on.item() != pytest.approx(off.item())


def test_flow_routed_loss_per_method():
    cfg = LossConfig(beta_x=0.03, beta_d=0.3, beta_jsd=0.03)
    t = _terms('nf_hybrid_ldlx', cfg)
    torch.testing.assert_close(flow_routed_loss('nf_hybrid_ldlx', t, cfg),
                               0.03 * t['x'] + 0.3 * t['d'])
    torch.testing.assert_close(flow_routed_loss('nf_hybrid_ld', t, cfg), 0.3 * t['d'])
    t = _terms('nflowjs', cfg)
    torch.testing.assert_close(flow_routed_loss('nflowjs', t, cfg), 0.03 * t['jsd'])
    assert flow_routed_loss('nf_oodhead', t, cfg) is None


def test_losses_reach_both_heads():
    logits, labels, ood = _batch(9)
    logits.requires_grad_()
    head = torch.zeros(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    out = {'logits': logits, 'outlier_logits': head}
    cfg = LossConfig()
    segmenter_loss('densehybrid', segmenter_terms('densehybrid', out, labels, ood, cfg),
                   cfg).backward()
    assert torch.count_nonzero(logits.grad) > 0 and torch.count_nonzero(head.grad) > 0
