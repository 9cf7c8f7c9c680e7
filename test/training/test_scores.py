"""Anomaly scores: hand-computed answers, relations that must hold, float16, errors."""

import math

import pytest
import torch

from anomaly_seg_node.errors import ConfigError, DataError
from training.scores import SCORE_INFO, SCORES, anomaly_score, score_info


def pixel(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One pixel's logits as [1, C, 1, 1]."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1)


def value(name: str, logits: torch.Tensor, outlier=None, temperature=None) -> float:
    return anomaly_score(name, logits, outlier, temperature).item()


def test_names_and_metadata():
    assert SCORES == ('OP', 'OPxMS', 'DH', 'JSD', 'MSP', 'max_logit', 'energy')
    assert {n for n in SCORES if SCORE_INFO[n].needs_outlier_head} == {'OP', 'OPxMS', 'DH'}
    assert score_info('DH').units == 'nats'
    assert score_info('OP').units == 'probability'
    assert score_info('OPxMS').units == 'probability'
    assert [score_info(n).default_temperature for n in ('OP', 'OPxMS', 'JSD')] == [2.0] * 3
    assert score_info('DH').default_temperature is None
    d = score_info('JSD').to_dict()
    assert d['name'] == 'JSD' and d['value_range'] == (-math.log(2), 0.0)


def test_op_known_answer():
    # softmax([0, 2 ln 3] / 2) = [1/4, 3/4]; at T = 1: softmax([0, 2 ln 3]) = [1/10, 9/10].
    o = pixel(0.0, 2 * math.log(3))
    s = pixel(0.0, 0.0)
    assert value('OP', s, o) == pytest.approx(0.75, abs=1e-12)
    assert value('OP', s, o, temperature=2) == pytest.approx(0.75, abs=1e-12)
    assert value('OP', s, o, temperature=1) == pytest.approx(0.9, abs=1e-12)


def test_opxms_known_answer():
    # OP = 3/4 (T = 2); softmax(s / 2) = [1, 2, 5] / 8, so 1 - MS = 3/8.
    o = pixel(0.0, 2 * math.log(3))
    s = pixel(0.0, 2 * math.log(2), 2 * math.log(5))
    assert value('OPxMS', s, o) == pytest.approx(0.75 * 0.375, abs=1e-12)


def test_dh_known_answer_and_formula():
    # ln(1/2) - ln(4 * e^0) = -ln 8
    assert value('DH', pixel(0.0, 0.0, 0.0, 0.0), pixel(0.0, 0.0)) == pytest.approx(
        -math.log(8), abs=1e-12)
    # ln(e^3 / (e^1 + e^3)) - ln(e^1 + e^2 + e^-1)
    got = value('DH', pixel(1.0, 2.0, -1.0), pixel(1.0, 3.0))
    want = math.log(math.exp(3) / (math.exp(1) + math.exp(3))) - math.log(
        math.exp(1) + math.exp(2) + math.exp(-1))
    assert got == pytest.approx(want, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 4
    o = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64) * 4
    p_out = o.exp()[:, 1] / o.exp().sum(1)
    torch.testing.assert_close(
        anomaly_score('DH', s, o), p_out.log() - s.exp().sum(1).log(), rtol=0, atol=1e-10)


def _jsd_uniform(p: list[float]) -> float:
    k = len(p)
    m = [(pi + 1 / k) / 2 for pi in p]
    kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True) if pi > 0)
    kl_um = sum(1 / k * math.log(1 / k / mi) for mi in m)
    return 0.5 * kl_pm + 0.5 * kl_um


def test_jsd_known_answers():
    assert value('JSD', pixel(3.0, 3.0, 3.0)) == pytest.approx(0.0, abs=1e-12)
    # One-hot P over K = 2: JSD = 3/4 ln(4/3), the most confident (least anomalous) value.
    assert value('JSD', pixel(1e4, -1e4)) == pytest.approx(-0.75 * math.log(4 / 3), abs=1e-12)
    assert _jsd_uniform([1.0, 0.0]) == pytest.approx(0.75 * math.log(4 / 3))
    # softmax([0, 2 ln 3] / 2) = [1/4, 3/4]
    s = pixel(0.0, 2 * math.log(3))
    assert value('JSD', s) == pytest.approx(-_jsd_uniform([0.25, 0.75]), abs=1e-12)
    assert value('JSD', s, temperature=1) == pytest.approx(-_jsd_uniform([0.1, 0.9]), abs=1e-12)
    # One-hot over 1000 classes: close to, but above, the bound -ln 2.
    big = torch.full((1, 1000, 1, 1), -100.0, dtype=torch.float64)
    big[0, 0] = 100.0
    want = -_jsd_uniform([1.0] + [0.0] * 999)
    assert value('JSD', big) == pytest.approx(want, abs=1e-12)
    assert -math.log(2) < want < -0.689


def test_msp_max_logit_energy_known_answers():
    s = pixel(0.0, math.log(2), math.log(5))  # softmax = [1, 2, 5] / 8
    assert value('MSP', s) == pytest.approx(3 / 8, abs=1e-12)
    assert value('MSP', s * 2, temperature=2) == pytest.approx(3 / 8, abs=1e-12)
    assert value('max_logit', pixel(1.0, 5.0, -2.0)) == -5.0
    assert value('energy', pixel(0.0, math.log(3))) == pytest.approx(-math.log(4), abs=1e-12)
    assert value('energy', pixel(0.0, 2 * math.log(3)), temperature=2) == pytest.approx(
        -2 * math.log(4), abs=1e-12)
    # MSP does not lose precision near certainty: 1 - softmax = e^-30 / (1 + e^-30).
    assert value('MSP', pixel(30.0, 0.0)) == pytest.approx(math.exp(-30), rel=1e-9)


def test_monotonic_relations_and_ranges():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 6, 5, 7, generator=g) * 5
    o = torch.randn(3, 2, 5, 7, generator=g) * 5
    op, opxms = anomaly_score('OP', s, o), anomaly_score('OPxMS', s, o)
    assert (opxms <= op).all()
    assert ((op >= 0) & (op <= 1)).all()
    msp = anomaly_score('MSP', s)
    assert ((msp >= 0) & (msp <= 1 - 1 / 6 + 1e-6)).all()
    jsd = anomaly_score('JSD', s)
    assert ((jsd <= 1e-7) & (jsd >= -math.log(2))).all()
    # DH = ln OP(T=1) - logsumexp: never above the log outlier probability minus the max logit.
    dh = anomaly_score('DH', s, o)
    assert (dh <= anomaly_score('OP', s, o, 1).log() - s.amax(1) + 1e-5).all()
    # energy <= max_logit (logsumexp >= max)
    assert (anomaly_score('energy', s) <= anomaly_score('max_logit', s)).all()
    # Scaling all logits up makes a pixel more confident: JSD and MSP scores go down.
    assert (anomaly_score('JSD', 3 * s) <= jsd + 1e-6).all()


@pytest.mark.parametrize('name', SCORES)
def test_shape_and_dtype(name):
    s = torch.randn(2, 4, 3, 5)
    o = torch.randn(2, 2, 3, 5)
    out = anomaly_score(name, s, o)
    assert out.shape == (2, 3, 5) and out.dtype == torch.float32


@pytest.mark.parametrize('name', SCORES)
@pytest.mark.parametrize(('dtype', 'big'), [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_large_logits_are_finite_and_right(name, dtype, big):
    # Confident inlier pixel: one class logit +big, others -big; outlier head says d_in.
    s = pixel(big, -big, 0.0, dtype=dtype)
    o = pixel(big / 2, -big / 2, dtype=dtype)
    out = anomaly_score(name, s, o)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = {
        'OP': 0.0, 'OPxMS': 0.0, 'MSP': 0.0, 'max_logit': -big, 'energy': -big,
        'JSD': -_jsd_uniform([1.0, 0.0, 0.0]),
        # ln P(d_out) = -big, logsumexp = big: -2 big overflows float16 and saturates.
        'DH': max(-2 * big, torch.finfo(dtype).min),
    }[name]
    assert out.item() == pytest.approx(want, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize('name', SCORES)
def test_float16_matches_float64(name):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64) * 6
    o = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64) * 6
    half = anomaly_score(name, s.half(), o.half()).double()
    torch.testing.assert_close(half, anomaly_score(name, s, o), rtol=1e-2, atol=2e-2)


def test_temperatures():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 4, 2, 2, generator=g)
    o = torch.randn(1, 2, 2, 2, generator=g)
    for name in ('OP', 'OPxMS', 'JSD'):
        default = anomaly_score(name, s, o)
        torch.testing.assert_close(default, anomaly_score(name, s, o, temperature=2.0))
        assert not torch.allclose(default, anomaly_score(name, s, o, temperature=1.0))
    torch.testing.assert_close(anomaly_score('DH', s, o, temperature=1), anomaly_score('DH', s, o))
    with pytest.raises(ConfigError, match='takes no temperature'):
        anomaly_score('DH', s, o, temperature=2.0)
    with pytest.raises(ConfigError, match='takes no temperature'):
        anomaly_score('max_logit', s, temperature=0.5)
    for bad in (0, -1.0, math.nan, math.inf, '2', True):
        with pytest.raises(ConfigError, match='finite number > 0'):
            anomaly_score('OP', s, o, temperature=bad)


def test_errors():
    s = torch.randn(1, 3, 2, 2)
    with pytest.raises(ConfigError, match='unknown anomaly score .*OPxMS'):
        anomaly_score('op', s)
    for name in ('OP', 'OPxMS', 'DH'):
        with pytest.raises(ConfigError, match='outlier_head=True'):
            anomaly_score(name, s)
    with pytest.raises(DataError, match=r'\[N, C, H, W\]'):
        anomaly_score('MSP', s[0])
    with pytest.raises(DataError, match='float tensor'):
        anomaly_score('MSP', s.long())
    with pytest.raises(DataError, match=r'\[1, 2, 2, 2\]'):
        anomaly_score('DH', s, torch.randn(1, 3, 2, 2))
    with pytest.raises(DataError, match='match logits'):
        anomaly_score('DH', s, torch.randn(1, 2, 4, 4))
    # Scores without the outlier head ignore it.
    anomaly_score('MSP', s, torch.randn(1, 3, 2, 2))
