"""Numerics of the loss terms and of the heads."""

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from hf_udkd.constants import IGNORE_INDEX
from hf_udkd.heads import AdaptiveFeatureFusion, FeatureDistributionHead, NoiseSource
from hf_udkd.losses import cross_entropy, dkd_loss, gaussian_kl, kd_loss, kd_terms, standardize

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


def test_cross_entropy_is_the_mean_over_labelled_examples_and_zero_without_any():
    labels = LABELS.clone()
    labels[::2] = IGNORE_INDEX
    torch.testing.assert_close(cross_entropy(S, labels), F.cross_entropy(S[1::2], LABELS[1::2]))
    torch.testing.assert_close(
        cross_entropy(S, labels, label_smoothing=0.1),
        F.cross_entropy(S[1::2], LABELS[1::2], label_smoothing=0.1),
    )
    pulled = S.clone().requires_grad_()
    none = cross_entropy(pulled, torch.full_like(LABELS, IGNORE_INDEX), label_smoothing=0.1)
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(pulled.grad, torch.zeros_like(S))


def test_dkd_takes_the_teachers_prediction_for_unlabelled_examples():
    unlabelled = torch.full_like(LABELS, IGNORE_INDEX)
    torch.testing.assert_close(dkd_loss(S, T, unlabelled, 4.0), dkd_loss(S, T, T.argmax(-1), 4.0))
    mixed = LABELS.clone()
    mixed[:3] = IGNORE_INDEX
    expected = LABELS.clone()
    expected[:3] = T[:3].argmax(-1)
    torch.testing.assert_close(dkd_loss(S, T, mixed, 4.0), dkd_loss(S, T, expected, 4.0))


def test_dkd_exposes_alpha_and_beta():
    tckd = dkd_loss(S, T, LABELS, 4.0, alpha=1.0, beta=0.0)
    nckd = dkd_loss(S, T, LABELS, 4.0, alpha=0.0, beta=1.0)
    torch.testing.assert_close(dkd_loss(S, T, LABELS, 4.0, alpha=2.0, beta=3.0), 2 * tckd + 3 * nckd)


def test_standardize_gives_zero_mean_unit_std_rows():
    z = standardize(3 * S + 5)
    torch.testing.assert_close(z.mean(-1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(-1), torch.ones(8))
    assert torch.isfinite(standardize(torch.ones(2, 10))).all(), "a constant row must stay finite"


def test_logit_standardization_makes_kd_and_dkd_invariant_to_logit_scale_and_shift():
    # A different positive scale and shift per example, on each side.
    scale_s, shift_s = torch.rand(8, 1) * 5 + 0.2, torch.randn(8, 1) * 10
    scale_t, shift_t = torch.rand(8, 1) * 5 + 0.2, torch.randn(8, 1) * 10
    moved_s, moved_t = S * scale_s + shift_s, T * scale_t + shift_t
    for temperature in (1.0, 4.0):
        torch.testing.assert_close(
            kd_loss(moved_s, moved_t, temperature, standardized=True), kd_loss(S, T, temperature, standardized=True)
        )
        torch.testing.assert_close(
            dkd_loss(moved_s, moved_t, LABELS, temperature, standardized=True),
            dkd_loss(S, T, LABELS, temperature, standardized=True),
        )
    # Without standardization the scale matters, so the test above could fail.
    assert not torch.isclose(kd_loss(moved_s, moved_t, 4.0), kd_loss(S, T, 4.0))
    # Standardizing is the plain loss on z-scored logits.
    torch.testing.assert_close(kd_loss(S, T, 4.0, standardized=True), kd_loss(standardize(S), standardize(T), 4.0))


def reference_kd(pulled: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """One KD term on its own, with F.kl_div: the per-term reference of the fused pass."""
    log_p_pulled = F.log_softmax(pulled.float() / temperature, dim=-1)
    log_p_target = F.log_softmax(target.float() / temperature, dim=-1)
    return F.kl_div(log_p_pulled, log_p_target, reduction="batchmean", log_target=True) * temperature**2


def test_fused_kd_terms_equal_each_term_computed_alone():
    a, b, c, d = torch.randn(4, 8, 10).unbind(0)
    pairs = [(S, T, 4.0), (a, b, 1.0), (c, d, 4.0), (a, S.bfloat16(), 1.0)]
    fused = kd_terms(pairs)
    assert len(fused) == 4
    for value, (pulled, target, temperature) in zip(fused, pairs, strict=True):
        torch.testing.assert_close(value, reference_kd(pulled, target, temperature), rtol=0, atol=1e-6)
    for value, (pulled, target, temperature) in zip(kd_terms(pairs, standardized=True), pairs, strict=True):
        expected = reference_kd(standardize(pulled.float()), standardize(target.float()), temperature)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert kd_terms([]) == []


def test_fused_kd_terms_give_each_pulled_side_its_own_gradient():
    pulled = [x.clone().requires_grad_() for x in (S, T)]
    sum(kd_terms([(pulled[0], T, 4.0), (pulled[1], S, 2.0)])).backward()
    for x, (target, temperature) in zip(pulled, [(T, 4.0), (S, 2.0)], strict=True):
        alone = x.detach().clone().requires_grad_()
        reference_kd(alone, target, temperature).backward()
        torch.testing.assert_close(x.grad, alone.grad, rtol=0, atol=1e-6)


def test_fusion_kaiming_init_has_no_conv_biases_and_kaiming_bounds():
    fusion = AdaptiveFeatureFusion([8, 16], width=12, out_channels=4, out_size=(2, 2), init="kaiming")
    convs = [fusion.laterals[0][0], fusion.laterals[1][0], fusion.output[0]]
    for conv in convs:
        assert conv.bias is None
        fan_in = conv.weight[0].numel()
        # Kaiming-uniform with a=1: U(-b, b), b = sqrt(6 / ((1 + a^2) fan_in)) = sqrt(3 / fan_in).
        bound = math.sqrt(3 / fan_in)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.8 * bound, "PyTorch's default bound, sqrt(1 / fan_in), is smaller"
    assert fusion.attentions[0].bias is not None
    default = AdaptiveFeatureFusion([8, 16], width=12, out_channels=4, out_size=(2, 2))
    assert all(conv.bias is not None for conv in (default.laterals[0][0], default.output[0]))
    assert fusion([torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]).shape == (2, 4, 2, 2)
