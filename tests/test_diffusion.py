"""Rectified flow: timesteps, loss target, the sampling loop's time convention and guidance."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from vidmoe.diffusion import (add_noise, flow_loss, gaussian_blur_frames, guided_velocity, make_scheduler, sample,
                              sample_timesteps, self_conditioned, to_uint8_frames)
from vidmoe.errors import UsageError


class OracleModel:
    """Predicts the exact velocity (x_t - x0) / t towards a known x0, and records the t it was given."""

    def __init__(self, x0):
        self.x0, self.calls, self.seen = x0, [], []

    def __call__(self, x, t, labels=None, captions=None, drop=None):
        self.calls.append((t.clone(), None if drop is None else drop.clone()))
        self.seen.append(x.clone())
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        return SimpleNamespace(sample=(x - x0) / t.view(-1, 1, 1, 1, 1))


def test_logit_normal_timesteps():
    t = sample_timesteps(20000, mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.01
    again = sample_timesteps(20000, mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_flow_loss_target_is_noise_minus_data():
    x0, noise = torch.randn(3, 2, 4, 8, 8), torch.randn(3, 2, 4, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    xt = add_noise(x0, t, noise)
    assert torch.allclose(xt[1], 0.5 * x0[1] + 0.5 * noise[1])
    exact = lambda x, t, labels=None, captions=None: SimpleNamespace(sample=noise - x0)  # noqa: E731
    loss, _ = flow_loss(exact, x0, t, noise)
    assert loss.shape == (3,) and loss.abs().max() < 1e-12
    zero = lambda x, t, labels=None, captions=None: SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    loss, _ = flow_loss(zero, x0, t, noise)
    assert torch.allclose(loss, ((noise - x0) ** 2).flatten(1).mean(1))


def test_flow_loss_from_a_degraded_source_targets_the_clean_clip():
    """Noising a blurred copy: the target still leads from x_t to the sharp x0, so an x0 oracle scores zero."""
    x0, noise = torch.randn(3, 2, 4, 8, 8), torch.randn(3, 2, 4, 8, 8)
    source = x0 + 0.3 * torch.randn_like(x0)
    t = torch.tensor([0.05, 0.3, 0.9])
    oracle = OracleModel(x0)
    loss, _ = flow_loss(lambda x, t, labels=None, captions=None: oracle(x, t), x0, t, noise, source=source)
    assert loss.abs().max() < 1e-9
    assert torch.allclose(oracle.calls[0][0], t)
    # The clean target (noise - x0) would not do: at low t the difference is amplified by (1 - t) / t.
    plain = lambda x, t, labels=None, captions=None: SimpleNamespace(sample=noise - x0)  # noqa: E731
    off, _ = flow_loss(plain, x0, t, noise, source=source)
    assert off[0] > 100 * off[2] > 0
    same, _ = flow_loss(plain, x0, t, noise, source=x0)
    assert same.abs().max() < 1e-9


def test_gaussian_blur_matches_torchvision_per_clip():
    from torchvision.transforms.functional import gaussian_blur

    x = torch.rand(2, 3, 4, 16, 16)
    sigma = torch.tensor([0.4, 1.0])
    out = gaussian_blur_frames(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        ref = gaussian_blur(x[i].flatten(0, 1), kernel_size=7, sigma=s).unflatten(0, (3, 4))
        assert torch.allclose(out[i], ref, atol=1e-6)
    flat = torch.full((1, 3, 2, 8, 8), 0.25)
    assert torch.allclose(gaussian_blur_frames(flat, torch.tensor([0.8])), flat)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "heun", "dpm++"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_with_exact_velocity_recovers_x0(name, shift):
    """Passes only if the model is given t = sigma in [0, 1] (not the scheduler's 0..1000 labels)."""
    x0 = torch.randn(2, 3, 4, 8, 8)
    oracle = OracleModel(x0)
    config = dict(FlowMatchEulerDiscreteScheduler(shift=shift).config)
    out = sample(oracle, x0.shape, steps=8, guidance=3.0, scheduler_name=name, scheduler_config=config,
                 generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max() < 1e-4
    first_t, first_drop = oracle.calls[0]
    assert torch.allclose(first_t, torch.ones_like(first_t), atol=2e-3)  # starts at pure noise
    assert all(0 < t.min() and t.max() <= 1 for t, _ in oracle.calls)
    assert first_drop.tolist() == [False, False, True, True]  # one batched forward: conditional, then null


def test_guidance_mixes_conditional_and_null_predictions():
    calls = []

    def model(x, t, labels=None, captions=None, drop=None):
        calls.append((x.shape[0], labels, captions))
        v = torch.where(drop.view(-1, 1, 1, 1, 1), torch.full_like(x, 1.0), torch.full_like(x, 3.0))
        return SimpleNamespace(sample=v)

    x = torch.zeros(2, 1, 2, 4, 4)
    v = guided_velocity(model, x, torch.full((2,), 0.5), torch.tensor([0, 2]), ["a", "b"], guidance=4.0)
    assert torch.allclose(v, torch.full_like(x, 1.0 + 4.0 * (3.0 - 1.0)))
    assert len(calls) == 1 and calls[0][0] == 4
    assert calls[0][1].tolist() == [0, 2, 0, 2] and calls[0][2] == ["a", "b", "a", "b"]


def test_guidance_interval_guides_only_the_noisy_steps():
    x0 = torch.randn(2, 1, 2, 4, 4)
    oracle = OracleModel(x0)
    out = sample(oracle, x0.shape, steps=10, guidance=3.0, scheduler_name="euler", guidance_min_t=0.5,
                 generator=torch.Generator().manual_seed(0))
    guided = [(float(t[0]), drop is not None) for t, drop in oracle.calls]
    assert len(guided) == 10 and all(flag == (t >= 0.5) for t, flag in guided)
    assert any(flag for _, flag in guided) and not all(flag for _, flag in guided)
    assert torch.allclose(out, x0, atol=1e-4)  # the oracle's null and conditional velocities agree


@pytest.mark.parametrize("name", ["euler", "euler-stochastic", "heun", "dpm++", "unipc"])
def test_sampling_from_a_noised_clip_skips_the_levels_above_it(name):
    x0 = torch.randn(2, 1, 2, 4, 4)
    oracle = OracleModel(x0)
    everything = OracleModel(x0)
    sample(everything, x0.shape, steps=10, guidance=1.0, scheduler_name=name, generator=torch.Generator().manual_seed(0))
    levels = [float(t[0]) for t, _ in everything.calls]
    # Given clean clips that are not x0, the oracle's steps move them onto x0's path: what is started
    # from is (1 - t0) init + t0 noise at the first step that starts at t0 <= start_t, then only the levels
    # from there on (Heun evaluates two levels a step; a start in the middle of a step once gave noise).
    init = torch.randn_like(x0)
    noise = torch.randn_like(x0)
    out = sample(oracle, x0.shape, steps=10, guidance=1.0, scheduler_name=name, noise=noise, init=init,
                 start_t=0.4, generator=torch.Generator().manual_seed(0))
    used = [float(t[0]) for t, _ in oracle.calls]
    first, order = len(levels) - len(used), 2 if name == "heun" else 1
    assert 0 < len(used) < len(levels) and used == levels[first:] and max(used) <= 0.4
    assert first % order == 0 and levels[first - order] > 0.4  # the last step to start above 0.4 is skipped
    assert torch.allclose(out, x0, atol=1e-4)
    t0 = used[0]
    assert oracle.seen[0].equal((1 - t0) * init + t0 * noise)
    with pytest.raises(ValueError, match="below every noise level"):
        sample(oracle, x0.shape, steps=10, scheduler_name=name, noise=noise, init=init, start_t=1e-4)


def test_guidance_one_is_a_single_conditional_forward():
    seen = []

    def model(x, t, labels=None, captions=None, drop=None):
        seen.append(drop)
        return SimpleNamespace(sample=torch.ones_like(x))

    v = guided_velocity(model, torch.zeros(2, 1, 2, 4, 4), torch.full((2,), 0.5), None, None, guidance=1.0)
    assert seen == [None] and torch.equal(v, torch.ones_like(v))


def test_scheduler_by_name():
    assert type(make_scheduler("euler")).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert make_scheduler("dpm++").config.prediction_type == "flow_prediction"
    with pytest.raises(UsageError, match="unknown scheduler"):
        make_scheduler("NoSuchScheduler")
    with pytest.raises(UsageError, match="not a flow-matching"):
        make_scheduler("DDPMScheduler")


def test_to_uint8_frames():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    frames = to_uint8_frames(x)
    assert frames.shape == (1, 4, 1, 1, 3) and frames.dtype == torch.uint8
    assert frames[0, :, 0, 0, 0].tolist() == [0, 128, 255, 255]


def test_self_conditioned_sampling_passes_each_branch_its_previous_estimate():
    seen = []

    class Model(torch.nn.Module):
        cfg = SimpleNamespace(self_condition=True)

        def forward(self, x, t, labels=None, captions=None, drop=None, self_cond=None):
            seen.append(self_cond.clone())
            null = torch.zeros(x.shape[0], 1, 1, 1, 1, dtype=torch.bool) if drop is None else drop.view(-1, 1, 1, 1, 1)
            # A distinct x0 per call and branch: the call's index, negative for the null branch.
            x0 = torch.where(null, -1.0, 1.0) * len(seen) * torch.ones_like(x)
            return SimpleNamespace(sample=(x - x0) / t.view(-1, 1, 1, 1, 1), x0=x0)

    shape = (2, 1, 2, 4, 4)
    sample(Model(), shape, labels=torch.tensor([0, 1]), steps=4, guidance=2.0, guidance_min_t=0.4,
           scheduler_name="euler", generator=torch.Generator().manual_seed(0))
    assert len(seen) == 4 and torch.equal(seen[0], torch.zeros(4, 1, 2, 4, 4))  # guided: cond + null rows
    for i in (1, 2):  # guided steps after the first: call i's estimates, cond rows then null rows
        assert seen[i][:2].eq(i).all() and seen[i][2:].eq(-i).all()
    assert seen[3].shape == shape and seen[3].eq(3).all()  # unguided (t < 0.4): the conditional estimate
    assert not self_conditioned(lambda x, t: x)
