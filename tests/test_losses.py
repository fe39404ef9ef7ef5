"""Numerics of the loss terms and of the heads."""

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from hf_udkd.heads import AdaptiveFeatureFusion, FeatureDistributionHead, NoiseSource
from hf_udkd.losses import dkd_loss, gaussian_kl, kd_loss

torch.manual_seed(0)
S, T = torch.randn(8, 10), torch.randn(8, 10)
LABELS = torch.randint(0, 10, (8,))


def test_kd_is_temperature_scaled_kl_from_target_to_pulled():
    expected = sum(
        (F.softmax(T[i] / 4, -1) * (F.log_softmax(T[i] / 4, -1) - F.log_softmax(S[i] / 4, -1))).sum()
        for i in range(8)
    ) / 8 * 16
    torch.testing.assert_close(kd_loss(S, T, 4.0), expected)


def test_kl_terms_vanish_for_equal_inputs():
    assert kd_loss(S, S.clone(), 4.0).abs() < 1e-6
    assert dkd_loss(S, S.clone(), LABELS, 4.0).abs() < 1e-5
    assert gaussian_kl(S, T, S.clone(), T.clone()).abs() < 1e-5


def test_kd_is_positive_and_asymmetric():
    assert kd_loss(S, T, 2.0) > 0
    assert not torch.isclose(kd_loss(S, T, 2.0), kd_loss(T, S, 2.0))


def test_gaussian_kl_matches_torch_distributions():
    mu_s, lv_s, mu_t, lv_t = torch.randn(4, 8, 10).unbind(0)
    expected = kl_divergence(Normal(mu_s, (0.5 * lv_s).exp()), Normal(mu_t, (0.5 * lv_t).exp())).sum(-1).mean()
    torch.testing.assert_close(gaussian_kl(mu_s, lv_s, mu_t, lv_t), expected)


def test_dkd_equals_weighted_tckd_plus_nckd():
    temperature = 4.0
    p_s, p_t = F.softmax(S / temperature, -1), F.softmax(T / temperature, -1)
    gt = F.one_hot(LABELS, 10).bool()
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], -1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean()
    # NCKD: KL between the distributions renormalised over the non-target classes.
    q_s = p_s.masked_fill(gt, 0) / (1 - p_s[gt]).unsqueeze(-1)
    q_t = p_t.masked_fill(gt, 0) / (1 - p_t[gt]).unsqueeze(-1)
    nckd = (q_t * ((q_t + 1e-30).log() - (q_s + 1e-30).log())).sum(-1).mean()
    expected = (tckd + 8.0 * nckd) * temperature**2
    torch.testing.assert_close(dkd_loss(S, T, LABELS, temperature), expected, rtol=1e-4, atol=1e-5)


def test_losses_run_in_float32_under_bfloat16_inputs():
    value = kd_loss(S.bfloat16(), T.bfloat16(), 4.0)
    assert value.dtype == torch.float32


def test_fusion_output_matches_teacher_tap_shape():
    stages = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 32, 1, 1)]
    for out_size in [(2, 2), (16, 16), (32, 32)]:
        fusion = AdaptiveFeatureFusion([8, 16, 32, 32], width=12, out_channels=24, out_size=out_size)
        assert fusion(stages).shape == (2, 24, *out_size)


def test_fusion_shrinks_by_averaging_not_picking_a_pixel():
    fusion = AdaptiveFeatureFusion([4], width=4, out_channels=4, out_size=(1, 1))
    with torch.no_grad():
        fusion.laterals[0][0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        fusion.laterals[0][0].bias.zero_()
    x = torch.zeros(1, 4, 4, 4)
    x[..., 3, 3] = 16.0  # a single bright pixel that nearest-neighbour shrinking would miss
    pooled = fusion.laterals[0](x)
    from hf_udkd.heads import _resize

    assert _resize(pooled, (1, 1)).flatten().tolist() == [1.0] * 4


def test_fusion_with_batch_norm_option():
    fusion = AdaptiveFeatureFusion([8, 16], width=8, out_channels=4, out_size=(2, 2), batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fusion.modules())
    assert fusion([torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]).shape == (2, 4, 2, 2)


def test_distribution_head_clamps_log_variance_and_accepts_pooled_input():
    head = FeatureDistributionHead(16, 10)
    with torch.no_grad():
        head.log_var.bias.fill_(100.0)
    x = torch.randn(3, 16, 2, 2)
    mu, log_var = head(x)
    assert mu.shape == log_var.shape == (3, 10)
    assert log_var.max() == 10.0
    mu_pooled, _ = head(x.mean((-2, -1)))
    torch.testing.assert_close(mu, mu_pooled)


def test_noise_source_is_seeded_and_restorable():
    mu, log_var = torch.zeros(4, 10), torch.zeros(4, 10)
    a, b = NoiseSource(seed=1), NoiseSource(seed=2)
    first = a.sample(mu, log_var)
    assert not torch.equal(first, b.sample(mu, log_var)), "different seeds (ranks) must draw different noise"
    state = {device: s.clone() for device, s in a.get_states().items()}
    expected = a.sample(mu, log_var)
    restored = NoiseSource(seed=1)
    restored.set_states(state)
    torch.testing.assert_close(restored.sample(mu, log_var), expected)
    # The same draw scaled by the predicted standard deviation, exp(log_var / 2).
    wide = NoiseSource(seed=1).sample(mu, torch.full((4, 10), 4.0))
    torch.testing.assert_close(wide, first * math.exp(2.0))


def test_noise_source_keeps_one_generator_per_device():
    mu, log_var = torch.zeros(4, 10), torch.zeros(4, 10)
    noise = NoiseSource(seed=1)
    noise.sample(mu, log_var)
    cpu_state = noise.get_states()["cpu"].clone()
    other_state = torch.Generator().manual_seed(99).get_state()
    # A checkpoint of nn.DataParallel replicas holds one state per device; each goes to its own device.
    noise.set_states({"cpu": cpu_state, "cuda:1": other_state})
    expected = torch.randn(4, 10, generator=torch.Generator().set_state(cpu_state))
    torch.testing.assert_close(noise.sample(mu, log_var), expected)
    states = noise.get_states()
    assert set(states) == {"cpu", "cuda:1"}
    assert torch.equal(states["cuda:1"], other_state), "a device not used yet keeps its restored state"
    assert not torch.equal(states["cpu"], cpu_state), "the CPU generator moved on"
    # Drawing again continues the same generator instead of restarting it from the seed.
    again = noise.sample(mu, log_var)
    assert not torch.equal(again, expected)
