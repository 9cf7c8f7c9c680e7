"""Losses of the paper's methods as pure functions on tensors (methods.md §2.2, §3.1, §3.3).

Shapes: class logits s [N, K, H, W], outlier-head logits [N, 2, H, W] (channel 1 = d_out), seg
labels [N, H, W] int64 with IGNORE_ID for void and pasted pixels, ood mask m [N, H, W] bool
(True on pasted negative pixels). Every loss returns a scalar and stays finite (zero) when its
pixel set is empty. Half-precision logits (AMP) are promoted to float32 first.
"""

import math

import torch
import torch.nn.functional as F

from anomaly_seg_node.labels import IGNORE_ID
from training.config import LossConfig

# Terms of the segmenter loss per method; the weights come from LossConfig.
SEGMENTER_TERMS: dict[str, tuple[str, ...]] = {
    'closed_set': ('cls',),
    'densehybrid': ('cls', 'x', 'd'),
    'nf_hybrid_js': ('cls', 'x', 'd'),
    'nf_hybrid_ldlx': ('cls', 'x', 'd'),
    'nf_hybrid_ld': ('cls', 'x', 'd'),
    'oodhead': ('cls', 'd'),
    'nf_oodhead': ('cls', 'd'),
    'nflowjs': ('cls', 'jsd'),
}
# Terms whose gradient w.r.t. the pasted pixels is sent into the flow (besides its MLE term).
FLOW_ROUTED_TERMS: dict[str, tuple[str, ...]] = {
    'nflowjs': ('jsd',),
    'nf_hybrid_js': ('jsd',),
    'nf_hybrid_ldlx': ('x', 'd'),
    'nf_hybrid_ld': ('d',),
    'nf_oodhead': (),
}


def _promote(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cls_loss(logits: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = IGNORE_ID) -> torch.Tensor:
    """L_cls: mean cross-entropy over pixels whose label is not `ignore_index`."""
    logits = _promote(logits)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction='sum')
    return total / (labels != ignore_index).sum().clamp_min(1)


def void_mask(labels: torch.Tensor, ood_mask: torch.Tensor,
              ignore_index: int = IGNORE_ID) -> torch.Tensor:
    """Void pixels [N, H, W]: ignored in the seg labels but not pasted (padding, 'other')."""
    return (labels == ignore_index) & ~ood_mask


def outlier_head_loss(outlier_logits: torch.Tensor, ood_mask: torch.Tensor,
                      void: torch.Tensor | None = None) -> torch.Tensor:
    """L_d: mean 2-class CE of the outlier head against m (1 = d_out).

    Over every pixel (DenseHybrid code), or over the non-void ones when `void` [N, H, W] is
    given (the flow variant's code, and Eq. 1's E over labelled inliers).
    """
    outlier_logits = _promote(outlier_logits)
    target = ood_mask.long()
    if void is not None:
        target = target.masked_fill(void, -100)
    total = F.cross_entropy(outlier_logits, target, ignore_index=-100, reduction='sum')
    return total / (target != -100).sum().clamp_min(1)


def energy_loss(logits: torch.Tensor, ood_mask: torch.Tensor) -> torch.Tensor:
    """L_x: mean of ln p̂(x) = logsumexp_k s_k(x) over the pasted pixels."""
    lse = torch.logsumexp(_promote(logits), dim=1)  # [N, H, W]
    m = ood_mask.to(lse.dtype)
    return (lse * m).sum() / m.sum().clamp_min(1)


def jsd_to_uniform(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """JSD(softmax(s / T) || U) per pixel [N, H, W], in nats, within [0, ln 2]."""
    log_p = F.log_softmax(_promote(logits) / temperature, dim=1)
    k = logits.shape[1]
    log_u = -math.log(k)
    # M = (P + U) / 2, in log space for stability.
    log_m = torch.logaddexp(log_p, torch.full_like(log_p, log_u)) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_um = ((log_u - log_m) / k).sum(dim=1)
    return 0.5 * (kl_pm + kl_um)


def jsd_loss(logits: torch.Tensor, ood_mask: torch.Tensor) -> torch.Tensor:
    """L_jsd: JSD to uniform summed over classes and pasted pixels / number of pasted pixels."""
    jsd = jsd_to_uniform(logits)
    m = ood_mask.to(jsd.dtype)
    return (jsd * m).sum() / m.sum().clamp_min(1)


def mle_bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
    """MLE term: mean over the batch of -ln p(x) / (ln 2 * dims); log_prob [N] in nats.

    dims = 3 * h * w, the colour values of one crop.
    """
    if dims < 1:
        raise ValueError(f'dims must be the number of colour values per crop (>= 1), got {dims}')
    return -_promote(log_prob).mean() / (dims * math.log(2.0))


def segmenter_terms(method: str, out: dict[str, torch.Tensor], labels: torch.Tensor,
                    ood_mask: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The unweighted terms of `method`'s segmenter loss: 'cls', 'x', 'd', 'jsd' as used."""
    names = SEGMENTER_TERMS[method]
    terms = {'cls': cls_loss(out['logits'], labels)}
    if 'x' in names:
        terms['x'] = energy_loss(out['logits'], ood_mask)
    if 'jsd' in names:
        terms['jsd'] = jsd_loss(out['logits'], ood_mask)
    if 'd' in names:
        void = void_mask(labels, ood_mask) if cfg.ld_ignore_void else None
        terms['d'] = outlier_head_loss(out['outlier_logits'], ood_mask, void)
    return terms


def weighted(terms: dict[str, torch.Tensor], names: tuple[str, ...],
             cfg: LossConfig) -> torch.Tensor:
    """Sum of the named terms with the config's weights ('cls' has weight 1)."""
    weights = {'cls': 1.0, 'x': cfg.beta_x, 'd': cfg.beta_d, 'jsd': cfg.beta_jsd}
    parts = [weights[name] * terms[name] for name in names]
    if not parts:
        raise ValueError('weighted() needs at least one term')
    return sum(parts[1:], parts[0])


def segmenter_loss(method: str, terms: dict[str, torch.Tensor],
                   cfg: LossConfig) -> torch.Tensor:
    """The segmenter's total: L_cls + 0.03 L_x + 0.3 L_d (DenseHybrid family), L_cls + β L_d
    (OODHead family, β = 1 in their configs), L_cls + 0.03 L_jsd (NFlowJS), L_cls (closed set).
    """
    return weighted(terms, SEGMENTER_TERMS[method], cfg)


def flow_routed_loss(method: str, terms: dict[str, torch.Tensor],
                     cfg: LossConfig) -> torch.Tensor | None:
    """The part of the segmenter's losses whose gradient the flow receives through the pasted
    pixels: 0.03 L_jsd (NFlowJS, NF-Hybrid-JS), 0.03 L_x + 0.3 L_d (LdLx), 0.3 L_d (Ld), None
    (NF-OODHead: MLE only).
    """
    names = FLOW_ROUTED_TERMS[method]
    return weighted(terms, names, cfg) if names else None
