"""DenseFlow: bijections round-trip, log-dets match autograd Jacobians, gradients, shapes."""

import json
import math

import pytest
import torch
from torch import nn

from anomaly_seg_node.errors import ConfigError, DataError
from training.networks.flow import PRESETS, DenseFlow, _straight_through_clamp
from training.networks.flow_modules import (
    ActNorm2d,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    InvertibleDenseBlock,
    Squeeze2d,
    SwitchChannels,
    Transition,
    noise_net_widths,
    squeeze2d,
    std_normal_log_prob,
    unsqueeze2d,
)

REFERENCE_PARAMS_25_6 = 35_736_742  # methods.md §4, analytic count of the Open-set-M2F code


def _perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its init (zero-init outputs make couplings the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    for m in module.modules():
        if isinstance(m, ActNorm2d):
            m.initialized.fill_(True)
    return module


def _jacobian_logdet(fn, v: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(fn, v, vectorize=True)
    return torch.linalg.slogdet(jac)[1]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, i = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(v[i:i + k].view(s))
        i += k
    return out


def _tiny(dtype: torch.dtype = torch.float64, perturb: bool = True) -> DenseFlow:
    flow = DenseFlow.from_preset('tiny').to(dtype)
    return _perturb(flow) if perturb else flow


# ---- single bijections ---------------------------------------------------------------------

def test_squeeze_known_layout_and_inverse():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z = squeeze2d(x)
    assert z.shape == (1, 4, 2, 2)
    # channel 4c + 2dy + dx holds pixel (2i + dy, 2j + dx)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]
    assert torch.equal(unsqueeze2d(z), x)


BIJECTIONS = {
    'squeeze': lambda: Squeeze2d(),
    'actnorm': lambda: ActNorm2d(5),
    'conv1x1': lambda: InvConv1x1(5),
    'coupling': lambda: AffineCoupling(5, mid_channels=8, depth=2, growth=4),
    'coupling_even': lambda: AffineCoupling(4, mid_channels=8, depth=2, growth=4),
    'switch': lambda: SwitchChannels(),
    'switch_even': lambda: SwitchChannels(),
    'glow_step': lambda: GlowStep(4, mid_channels=8, depth=2, growth=4),
}


@pytest.mark.parametrize('name', sorted(BIJECTIONS))
def test_bijection_inverse_and_logdet(name):
    torch.manual_seed(0)
    bij = _perturb(BIJECTIONS[name]().double()).eval()
    channels = 4 if name.endswith('even') or name == 'glow_step' else 5
    x = torch.randn(1, channels, 4, 4, dtype=torch.float64)
    z, ldj = bij(x)
    assert ldj.shape == (1,)
    torch.testing.assert_close(bij.inverse(z), x, rtol=0, atol=1e-12)
    expected = _jacobian_logdet(lambda v: bij(v.view_as(x))[0].reshape(-1), x.reshape(-1))
    torch.testing.assert_close(ldj[0], expected, rtol=0, atol=1e-10)
    if name.startswith('coupling'):
        assert abs(ldj.item()) > 1e-3  # the check above was not against a trivial identity


def test_logdet_is_per_sample_for_a_batch():
    torch.manual_seed(1)
    step = _perturb(GlowStep(4, mid_channels=8, depth=2, growth=4).double())
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    _, ldj = step(x)
    singles = torch.cat([step(x[i:i + 1])[1] for i in range(3)])
    torch.testing.assert_close(ldj, singles)
    assert ldj.std() > 1e-6  # couplings make the samples' log-dets differ


def test_actnorm_data_dependent_init_on_first_training_batch_only():
    torch.manual_seed(2)
    norm = ActNorm2d(3)
    x = 5.0 + 3.0 * torch.randn(4, 3, 8, 8)
    norm.eval()
    z, _ = norm(x)
    assert torch.equal(z, x) and not bool(norm.initialized)  # eval never initialises
    norm.train()
    z, _ = norm(x)
    assert bool(norm.initialized)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    shift = norm.shift.detach().clone()
    norm(x + 100.0)  # second batch: parameters are not re-estimated
    assert torch.equal(norm.shift.detach(), shift)
    assert bool(DenseFlow.from_config(DenseFlow.from_preset('tiny').config())
                .state_dict()['blocks.0.units.0.0.steps.0.initialized']) is False


def test_noise_net_inputs_are_the_inputs_of_all_previous_units():
    # methods.md §4: g_i input widths for level 0 of 25-6 are 12 and 24 channels
    assert noise_net_widths(12, 3, 6) == [12, 24]
    assert noise_net_widths(48, 2, 6) == [48]
    assert noise_net_widths(108, 1, 6) == []
    assert noise_net_widths(12, 4, 6) == [12, 24, 42]


def test_cross_unit_coupling_with_fixed_noise_is_a_bijection_with_matching_logdet():
    torch.manual_seed(3)
    block = _perturb(InvertibleDenseBlock(4, num_units=3, steps_per_unit=1, growth_rate=2,
                                          mid_channels=8, depth=2, growth=4).double())
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    eta_shapes = block.noise_shapes(1, 3, 3)
    etas = [torch.randn(s, dtype=torch.float64) for s in eta_shapes]
    z, ldj, log_q = block(x, etas)
    assert z.shape == (1, 8, 3, 3) and block.out_channels == 8
    torch.testing.assert_close(log_q, sum(std_normal_log_prob(e) for e in etas))
    torch.testing.assert_close(block.inverse(z), x, rtol=0, atol=1e-12)

    shapes = [tuple(x.shape)] + eta_shapes

    def fn(v):
        x_, *etas_ = _unflat(v, shapes)
        return block(x_, etas_)[0].reshape(-1)

    expected = _jacobian_logdet(fn, _flat([x, *etas]))
    torch.testing.assert_close(ldj[0], expected, rtol=0, atol=1e-10)


def test_cross_unit_noise_is_transformed_by_the_noise_net():
    torch.manual_seed(4)
    block = InvertibleDenseBlock(4, num_units=2, steps_per_unit=1, growth_rate=2,
                                 mid_channels=8, depth=2, growth=4).double().eval()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    eta = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    # zero-init g_1: eta_hat = eta, log sigma = 0; the unit steps are volume preserving at init
    # (up to the float32 orthogonal init of the 1x1 convs)
    z0, ldj0, _ = block(x, [eta])
    assert abs(ldj0.item()) < 1e-4
    with torch.no_grad():
        block.noise_nets[0].conv1.bias[:2].fill_(0.25)  # mu
        block.noise_nets[0].conv1.bias[2:].fill_(2.0)  # raw log sigma
    z1, ldj1, _ = block(x, [eta])
    sigma = math.exp(2.0 * math.tanh(1.0))
    torch.testing.assert_close(ldj1 - ldj0, torch.full((1,), math.log(sigma) * eta.numel(),
                                                       dtype=torch.float64))
    # the second unit sees cat(x, eta_hat): invert it and read eta_hat back
    unit_in = block.units[1][0].inverse(z1)
    torch.testing.assert_close(unit_in[:, 4:], 0.25 + sigma * eta)
    torch.testing.assert_close(block.units[1][0].inverse(z0)[:, 4:], eta)


def test_transition_factor_out_round_trip_and_volume_preserving():
    torch.manual_seed(5)
    trans = Transition()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    kept, factored = trans(x)
    assert kept.shape == factored.shape == (2, 12, 2, 2)
    torch.testing.assert_close(trans.inverse(kept, factored), x, rtol=0, atol=0)
    x1 = x[:1]
    logdet = _jacobian_logdet(lambda v: torch.cat(trans(v.view_as(x1)), 1).reshape(-1),
                              x1.reshape(-1))
    assert abs(logdet.item()) < 1e-12
    assert trans.inverse(kept).shape == x.shape  # a fresh half is drawn when none is given


# ---- the whole flow -------------------------------------------------------------------------

def test_whole_flow_round_trip_float64_and_float32():
    torch.manual_seed(6)
    for dtype, atol in ((torch.float64, 1e-11), (torch.float32, 1e-4)):
        flow = _tiny(dtype).eval()
        y = torch.rand(2, 3, 16, 16, dtype=dtype)
        latents, _, _ = flow.encode(y)
        shapes = [tuple(t.shape) for t in latents]
        assert shapes == flow.latent_shapes(2, 16, 16) == [(2, 28, 4, 4), (2, 56, 2, 2),
                                                           (2, 56, 2, 2)]
        torch.testing.assert_close(flow.decode(latents), y, rtol=0, atol=atol)


def test_whole_flow_logdet_matches_autograd_jacobian():
    torch.manual_seed(7)
    flow = _tiny().eval()
    y = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    eta_shapes = flow.noise_shapes(1, 8, 8)
    etas = [[torch.randn(s, dtype=torch.float64) for s in level] for level in eta_shapes]
    latents, ldj, _ = flow.encode(y, etas)
    counts = [len(level) for level in eta_shapes]
    shapes = [tuple(y.shape)] + [s for level in eta_shapes for s in level]
    assert sum(math.prod(s) for s in shapes) == sum(t.numel() for t in latents)  # square map

    def fn(v):
        y_, *flat_etas = _unflat(v, shapes)
        grouped, i = [], 0
        for c in counts:
            grouped.append(flat_etas[i:i + c])
            i += c
        return _flat(flow.encode(y_, grouped)[0])

    expected = _jacobian_logdet(fn, _flat([y] + [e for level in etas for e in level]))
    torch.testing.assert_close(ldj[0], expected, rtol=0, atol=1e-9)
    assert abs(ldj.item()) > 0.1  # not a trivially volume-preserving flow


def test_log_prob_of_a_fresh_flow_is_a_gaussian_of_the_dequantised_image():
    # At init every step is volume preserving and orthogonal (identity couplings, orthogonal
    # 1x1 convs, eta_hat = eta), so log p(x) = log N(y - 0.5; 0, I) - D ln 256 exactly.
    torch.manual_seed(8)
    flow = DenseFlow.from_preset('tiny').double().eval()
    for m in flow.modules():
        if isinstance(m, InvConv1x1):
            nn.init.orthogonal_(m.weight)  # orthogonal to float64 precision
    x = torch.randint(0, 256, (2, 3, 16, 16)).double()
    torch.manual_seed(9)
    log_p = flow.log_prob(x)
    torch.manual_seed(9)
    y = (x + torch.rand_like(x)) / 256.0
    expected = std_normal_log_prob(y - 0.5) - x[0].numel() * math.log(256.0)
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-9)
    torch.manual_seed(9)
    bpd = flow.bits_per_dim(x)
    torch.testing.assert_close(bpd, -expected / (768 * math.log(2.0)))


def test_log_prob_assembles_base_factored_ldj_noise_and_dequantisation():
    torch.manual_seed(10)
    flow = _tiny().eval()
    x = torch.randint(0, 256, (2, 3, 16, 16)).double()
    torch.manual_seed(11)
    log_p = flow.log_prob(x)
    torch.manual_seed(11)
    torch.testing.assert_close(flow(x), log_p)  # forward is log_prob
    torch.manual_seed(11)
    y = (x + torch.rand_like(x)) / 256.0
    latents, ldj, log_q = flow.encode(y)
    expected = (flow.base_log_prob(latents[-1]) + sum(std_normal_log_prob(t) for t in latents[:-1])
                + ldj - log_q - 768 * math.log(256.0))
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-9)
    # per-channel base: loc and log-scale move the density as a diagonal Gaussian
    z = torch.randn(1, flow.latent_channels, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        flow.base_loc.fill_(0.5)
        flow.base_log_scale.fill_(math.log(2.0))
    dist = torch.distributions.Normal(0.5, 2.0)
    torch.testing.assert_close(flow.base_log_prob(z), dist.log_prob(z).sum((1, 2, 3)))


def test_gradient_reaches_every_parameter_from_log_prob():
    torch.manual_seed(12)
    flow = _tiny(torch.float32)
    flow.train()
    flow.log_prob(torch.randint(0, 256, (2, 3, 16, 16)).float()).sum().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_from_a_loss_on_differentiable_samples():
    torch.manual_seed(13)
    flow = _tiny(torch.float32)
    samples = flow.sample(2, 16, 16, differentiable=True)
    assert samples.requires_grad
    (samples / 255.0).square().mean().backward()
    for name, p in flow.named_parameters():
        if '.noise_nets.' in name:
            # sampling drops the noise channels, so g_i never shapes a sample
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_grad_sampling_matches_the_differentiable_path():
    flow = _tiny(torch.float32)
    torch.manual_seed(14)
    a = flow.sample(2, 16, 24)
    torch.manual_seed(14)
    b = flow.sample(2, 16, 24, differentiable=True)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach())


def test_straight_through_clamp():
    x = torch.tensor([-3.0, 0.0, 100.0, 300.0], requires_grad=True)
    y = _straight_through_clamp(x, 0.0, 255.0)
    assert y.tolist() == [0.0, 0.0, 100.0, 255.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize('size', [(16, 16), (24, 216), (216, 216), (8, 40)])
def test_sample_shapes_and_range(size):
    torch.manual_seed(15)
    flow = _tiny(torch.float32, perturb=False)
    s = flow.sample(2, *size)
    assert s.shape == (2, 3, *size)
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 255
    assert s.std() > 1.0  # actual samples, not a constant


def test_mle_steps_lower_bits_per_dim():
    torch.manual_seed(16)
    flow = DenseFlow.from_preset('tiny')
    ramp = torch.linspace(40.0, 200.0, 16)
    batch = torch.stack([ramp.view(1, 16).expand(16, 16), ramp.view(16, 1).expand(16, 16),
                         torch.full((16, 16), 90.0)])[None].repeat(2, 1, 1, 1)
    batch = (batch + torch.randint(0, 8, batch.shape)).clamp(0, 255).round()
    flow.train()
    flow.log_prob(batch)  # data-dependent ActNorm init

    def bpd() -> float:
        torch.manual_seed(17)
        with torch.no_grad():
            return flow.eval().bits_per_dim(batch).mean().item()

    before = bpd()
    opt = torch.optim.Adamax(flow.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-7)
    flow.train()
    for _ in range(8):
        opt.zero_grad()
        flow.bits_per_dim(batch).mean().backward()
        opt.step()
    after = bpd()
    assert after < before - 0.3, (before, after)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(18)
    plain = _perturb(DenseFlow.from_preset('tiny'))
    ckpt = DenseFlow.from_preset('tiny', checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 3, 16, 16)).float()
    for flow in (plain, ckpt):
        torch.manual_seed(19)
        flow.train()
        flow.log_prob(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# ---- configuration, presets, sizes and errors -----------------------------------------------

def _analytic_param_count(block_config, layers_config, mid_channels, growth_rate, dense_depth,
                          dense_growth, in_channels=3) -> int:
    """Counted from the architecture description of methods.md §4, independently of the code."""
    def conv(cin, cout, k=1):
        return cin * cout * k * k + cout

    def coupling_net(c, mid):
        cond, out = c - c // 2, c // 2
        total = conv(cond, mid) + conv(mid + dense_depth * dense_growth, 3 * mid) \
            + conv(mid, 2 * out)
        for i in range(dense_depth):
            width = mid + i * dense_growth
            total += conv(width, width) + conv(width, dense_growth, 3)
        return total

    total, c = 0, 4 * in_channels
    for level, units in enumerate(block_config):
        widths = [c + i * growth_rate for i in range(units)]
        for i, width in enumerate(widths):
            if i > 0:  # g_i sees the unit inputs (before noise) of units 0..i-1
                g_in = c + sum(widths[:i - 1])
                total += conv(g_in, 4 * g_in, 3) + conv(4 * g_in, 2 * growth_rate)
            # per step: actnorm (2c) + 1x1 conv (c^2) + coupling net
            step = 2 * width + width * width + coupling_net(width, mid_channels[level])
            total += layers_config[level] * step
        c = widths[-1] * (2 if level < len(block_config) - 1 else 1)
    return total + 2 * c  # base loc and log-scale per channel


def test_parameter_count_25_6_matches_the_reference():
    flow = DenseFlow.from_preset('25-6')
    count = sum(p.numel() for p in flow.parameters())
    assert count == REFERENCE_PARAMS_25_6 == _analytic_param_count(**PRESETS['25-6'])
    assert flow.latent_channels == 108
    assert sum(len(u) for b in flow.blocks for u in b.units) == 25


def test_parameter_count_tiny():
    flow = DenseFlow.from_preset('tiny')
    count = sum(p.numel() for p in flow.parameters())
    assert count == _analytic_param_count(**PRESETS['tiny']) == 55_330
    assert flow.latent_channels == 56


def test_25_6_log_prob_and_sample_on_a_small_patch():
    torch.manual_seed(20)
    flow = DenseFlow.from_preset('25-6').eval()
    x = torch.randint(0, 256, (1, 3, 16, 16)).float()
    assert torch.isfinite(flow.log_prob(x)).all()
    assert flow.sample(1, 16, 24).shape == (1, 3, 16, 24)


def test_config_round_trip():
    flow = _tiny(torch.float32)
    config = flow.config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = DenseFlow.from_config(config)
    rebuilt.load_state_dict(flow.state_dict())
    x = torch.randint(0, 256, (1, 3, 8, 8)).float()
    torch.manual_seed(21)
    a = flow.eval().log_prob(x)
    torch.manual_seed(21)
    b = rebuilt.eval().log_prob(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize('bad, match', [
    (torch.zeros(1, 3, 12, 16), 'multiples of 8'),
    (torch.zeros(1, 3, 16, 20), 'multiples of 8'),
    (torch.zeros(1, 1, 16, 16), r'\[N, 3, H, W\]'),
    (torch.zeros(3, 16, 16), r'\[N, 3, H, W\]'),
    (torch.full((1, 3, 8, 8), 256.0), r'\[0, 255\]'),
    (torch.full((1, 3, 8, 8), -1.0), r'\[0, 255\]'),
    (torch.full((1, 3, 8, 8), float('nan')), r'\[0, 255\]'),
])
def test_bad_images_raise_data_error(bad, match):
    flow = DenseFlow.from_preset('tiny')
    with pytest.raises(DataError, match=match):
        flow.log_prob(bad)


def test_bad_sample_requests_and_configs():
    flow = DenseFlow.from_preset('tiny')
    with pytest.raises(DataError, match='multiples of 8'):
        flow.sample(1, 20, 16)
    with pytest.raises(DataError, match='multiples of 8'):
        flow.sample(1, 0, 16)
    with pytest.raises(DataError, match='positive number'):
        flow.sample(0, 16, 16)
    with pytest.raises(ConfigError, match='25-6'):
        DenseFlow.from_preset('74-10')
    with pytest.raises(ConfigError, match='unknown DenseFlow config keys'):
        DenseFlow.from_config({**flow.config(), 'mid': 3})
    with pytest.raises(ConfigError, match='one entry per level'):
        DenseFlow(block_config=[1, 1], layers_config=[1], mid_channels=[8, 8])
    with pytest.raises(ConfigError, match='positive integers'):
        DenseFlow(growth_rate=-1)
