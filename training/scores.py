"""Per-pixel anomaly scores (methods.md §2.4, §5); higher = more anomalous for every score.

Inputs are full-resolution head outputs: class logits s `[N, K, H, W]` and, for the DenseHybrid
scores, the outlier head's logits l `[N, 2, H, W]` (channel 1 = d_out). Sign conventions:

- OP     = P(d_out|x) = softmax(l / T)[1]                          probability, T = 2
- OPxMS  = OP * (1 - max_k softmax(s / T)_k)                       probability, T = 2 on both
- DH     = ln P(d_out|x) - logsumexp_k s_k = ln P(d_out|x) - ln p̂(x)   nats, no temperature
- JSD    = -JSD(softmax(s / T) || U), U uniform over K             nats in [-ln 2, 0], T = 2
           (the divergence is large for confident inliers, hence the minus)
- MSP    = 1 - max_k softmax(s / T)_k                              probability, T = 1
- max_logit = -max_k s_k                                           logit
- energy = -T * logsumexp_k(s_k / T) = -ln p̂(x) at T = 1          nats, T = 1

Everything is computed in the input dtype through log-softmax / logsumexp, so float16 works;
a value beyond the dtype's range (only DH, max_logit and energy are unbounded) saturates at its
largest finite magnitude instead of becoming infinite.
"""

import math
import numbers

import torch

from anomaly_seg_node.errors import ConfigError, DataError
from training.score_info import SCORE_INFO, SCORES, ScoreInfo, score_info

# The table of the scores lives in the torch-free training.score_info; re-exported here.
__all__ = ['SCORES', 'SCORE_INFO', 'ScoreInfo', 'anomaly_score', 'score_info']


def anomaly_score(
    name: str,
    logits: torch.Tensor,
    outlier_logits: torch.Tensor | None = None,
    temperature: float | None = None,
) -> torch.Tensor:
    """Per-pixel anomaly score `[N, H, W]` (higher = more anomalous) in the logits' dtype.

    Args:
        name: one of SCORES.
        logits: class logits s `[N, K, H, W]`.
        outlier_logits: outlier head logits `[N, 2, H, W]`; needed by OP, OPxMS and DH.
        temperature: T; None takes the score's default (2 for OP, OPxMS and JSD).
    """
    info = score_info(name)
    t = _temperature(info, temperature)
    _check_logits('logits', logits)
    if info.needs_outlier_head:
        if outlier_logits is None:
            raise ConfigError(
                f'anomaly score {name!r} needs the outlier head logits [N, 2, H, W]; build the '
                f'network with outlier_head=True, or choose a score without it '
                f'({", ".join(n for n in SCORES if not SCORE_INFO[n].needs_outlier_head)})')
        _check_outlier(logits, outlier_logits)

    if name == 'OP':
        score = _outlier_probability(outlier_logits, t)
    elif name == 'OPxMS':
        score = _outlier_probability(outlier_logits, t) * _msp(logits, t)
    elif name == 'DH':
        score = _log_p_out(outlier_logits) - _logsumexp_classes(logits)
    elif name == 'JSD':
        score = -_jsd_from_uniform(logits, t)
    elif name == 'MSP':
        score = _msp(logits, t)
    elif name == 'max_logit':
        score = -logits.amax(dim=1)
    else:  # energy
        score = -t * torch.logsumexp(logits / t, dim=1)
    finfo = torch.finfo(score.dtype)
    return score.clamp(finfo.min, finfo.max)


def _log_p_out(outlier_logits: torch.Tensor) -> torch.Tensor:
    # ln softmax(l)[1] = ln sigmoid(l1 - l0) = -softplus(l0 - l1): one elementwise pass instead
    # of a channel-axis log-softmax, which ONNX Runtime runs as several slow reductions.
    return -torch.nn.functional.softplus(outlier_logits[:, 0] - outlier_logits[:, 1])


def _logsumexp_classes(logits: torch.Tensor) -> torch.Tensor:
    # Written out (max-shifted) rather than torch.logsumexp: exported to ONNX the latter becomes
    # ReduceLogSumExp, which ONNX Runtime's CPU provider runs ~3x slower than these four ops.
    m = logits.amax(dim=1, keepdim=True)
    return m.squeeze(1) + torch.log(torch.exp(logits - m).sum(dim=1))


def _outlier_probability(outlier_logits: torch.Tensor, t: float) -> torch.Tensor:
    return torch.softmax(outlier_logits / t, dim=1)[:, 1]


def _msp(logits: torch.Tensor, t: float) -> torch.Tensor:
    # 1 - max softmax without cancellation near 1: -expm1(max log-softmax).
    return 0.0 - torch.expm1(torch.log_softmax(logits / t, dim=1).amax(dim=1))


def _jsd_from_uniform(logits: torch.Tensor, t: float) -> torch.Tensor:
    """JSD(P || U) = KL(P || M) / 2 + KL(U || M) / 2, M = (P + U) / 2, summed over classes."""
    k = logits.shape[1]
    log_p = torch.log_softmax(logits / t, dim=1)
    p = log_p.exp()
    log_m = torch.log(0.5 * (p + 1.0 / k))  # M >= 1 / (2K): finite
    # P ln(P / M) is 0 where P underflows (log_p may be -inf there).
    kl_pm = (p * torch.where(p > 0, log_p - log_m, torch.zeros_like(log_p))).sum(dim=1)
    kl_um = ((-math.log(k) - log_m) / k).sum(dim=1)
    return 0.5 * (kl_pm + kl_um)


def _temperature(info: ScoreInfo, temperature: float | None) -> float:
    if temperature is None:
        return 1.0 if info.default_temperature is None else float(info.default_temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(float(temperature)) and temperature > 0):
        raise ConfigError(
            f'temperature for score {info.name!r} must be a finite number > 0, got '
            f'{temperature!r}')
    if info.default_temperature is None and temperature != 1:
        raise ConfigError(
            f'score {info.name!r} takes no temperature, got {temperature!r}; pass None (or 1)')
    return float(temperature)


def _check_logits(what: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        found = (f'{x.dtype} {list(x.shape)}' if isinstance(x, torch.Tensor)
                 else type(x).__name__)
        raise DataError(
            f'{what} must be a float tensor [N, C, H, W], got {found}; pass the network output '
            'upsampled to the image size')


def _check_outlier(logits: torch.Tensor, outlier_logits: torch.Tensor) -> None:
    _check_logits('outlier_logits', outlier_logits)
    n, _, h, w = logits.shape
    if outlier_logits.shape[1] != 2 or outlier_logits.shape[0] != n or (
            outlier_logits.shape[2:] != logits.shape[2:]):
        raise DataError(
            f'outlier_logits must be [N, 2, H, W] = [{n}, 2, {h}, {w}] to match logits '
            f'{list(logits.shape)}, got {list(outlier_logits.shape)}; pass the DenseHybrid '
            'outlier head output upsampled to the same size')
