import math

import pytest
import torch

from vidmoe.config import MoEConfig
from vidmoe.moe import MoEFeedForward, grouped_mm_supported, switch_balance_loss

D, H, E = 16, 8, 4


def make_moe(**options) -> MoEFeedForward:
    torch.manual_seed(0)
    moe = MoEFeedForward(D, H, MoEConfig(num_experts=E, **options))
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # a decisive router, so routing is not a near-tie
    return moe


def run(moe, x, path):
    """Output and gradients of one dispatch path (routing is deterministic, so both paths see the same)."""
    moe.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    route = moe.router(x)
    counts = torch.bincount(route.expert_ids, minlength=E)
    if path == "loop":
        y = moe.loop_reference(x, route)
    else:
        moe.cfg.dispatch = path
        y = moe._dispatch(x, route, counts)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {"x": x.grad, "w_in": moe.experts.w_in.grad, "w_out": moe.experts.w_out.grad,
             "router": moe.router.weight.grad}
    return y.detach(), {k: v.clone() for k, v in grads.items()}


@pytest.mark.parametrize("options", [
    dict(top_k=2),
    dict(top_k=1, renormalize=False),
    dict(top_k=2, capacity_factor=0.5),
    dict(top_k=2, router="expert_choice"),
])
@pytest.mark.parametrize("path", ["grouped", "auto"])
@pytest.mark.parametrize("tokens", [37, 301])  # 301: groups longer than SEGMENT_ROWS and not multiples of it
@pytest.mark.parametrize("blocked", [True, False])
def test_dispatch_matches_loop_reference(options, path, tokens, blocked):
    moe = make_moe(**options)
    if blocked:
        moe.router.blocked_experts = {3}  # expert 3 gets no token: an empty group
    x = torch.randn(tokens, D)
    route = moe.router(x)
    assert (int((route.expert_ids == 3).sum()) == 0) == blocked
    ref, ref_grads = run(moe, x, "loop")
    out, grads = run(moe, x, path)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_path_is_taken_for_aligned_widths():
    moe = make_moe(top_k=2)
    assert grouped_mm_supported(torch.zeros(1, D), moe.experts.w_in, moe.experts.w_out)
    assert not grouped_mm_supported(torch.zeros(1, 6), torch.zeros(2, 6, 10))


def test_capacity_drops_are_counted_and_respect_capacity():
    moe = make_moe(top_k=2, capacity_factor=0.5)
    moe.train()
    x = torch.randn(64, D)
    route = moe.router(x)
    counts = torch.bincount(route.expert_ids, minlength=E)
    capacity = math.ceil(0.5 * 64 * 2 / E)
    assert int(counts.max()) <= capacity
    assert route.dropped == 64 * 2 - int(counts.sum()) > 0
    moe(x)
    assert moe.stats()["dropped_frac"] == pytest.approx(route.dropped / 128)


def test_expert_choice_fills_every_expert_exactly():
    moe = make_moe(top_k=2, router="expert_choice")
    counts = torch.bincount(moe.router(torch.randn(40, D)).expert_ids, minlength=E)
    assert counts.tolist() == [math.ceil(40 * 2 / E)] * E


def test_expert_choice_picks_within_each_clip():
    """Each expert takes the same number of tokens from every clip, so a clip's output does not depend on
    which clips share its batch; the batched path agrees with the loop on [B, L, D] input."""
    moe = make_moe(top_k=2, router="expert_choice")
    clips = torch.randn(3, 20, D)
    route = moe.router(clips.reshape(-1, D), groups=3)
    per_clip = torch.bincount(route.token_ids // 20 * E + route.expert_ids, minlength=3 * E)
    assert per_clip.tolist() == [math.ceil(20 * 2 / E)] * (3 * E)
    assert route.per_expert == 3 * math.ceil(20 * 2 / E)
    together, _ = moe(clips)
    alone, _ = moe(clips[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.reshape(-1, D), moe.loop_reference(clips.reshape(-1, D), route),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 3"):
        moe.router(torch.randn(50, D), groups=3)


def test_switch_balance_loss_bounds():
    n = 64
    uniform_probs = torch.full((n, E), 1.0 / E)
    uniform_counts = torch.full((E,), n // E)
    assert switch_balance_loss(uniform_probs, uniform_counts).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(n, E)
    collapsed_probs[:, 0] = 1.0
    collapsed_counts = torch.tensor([n, 0, 0, 0])
    assert switch_balance_loss(collapsed_probs, collapsed_counts).item() == pytest.approx(E)


def test_bias_balancing_moves_a_skewed_router_toward_uniform():
    moe = make_moe(top_k=1, balance="bias", bias_update_rate=0.02)
    moe.train()
    with torch.no_grad():
        moe.router.weight[0, 0] += 3.0  # a feature every token shares pulls it toward expert 0
    x = torch.randn(256, D)
    x[:, 0] = 1.0

    def imbalance():
        load = torch.bincount(moe.router(x).expert_ids, minlength=E).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(100):
        moe(x)
        moe.update_bias()
    after = imbalance()
    assert before > 1.8  # expert 0 takes about half of all tokens
    assert after < 1.25


def test_gradients_reach_every_expert_that_received_tokens():
    moe = make_moe(top_k=2)
    moe.router.blocked_experts = {1}
    y, _ = moe(torch.randn(50, D))
    y.square().sum().backward()
    per_expert = moe.experts.w_in.grad.abs().sum(dim=(1, 2))
    assert per_expert[1] == 0
    assert (per_expert[[0, 2, 3]] > 0).all()
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_losses_and_counters():
    moe = make_moe(top_k=2, z_loss_coef=0.1)
    moe.train()
    x = torch.randn(30, D)
    _, aux = moe(x)
    assert set(aux.losses) == {"balance_loss", "z_loss"}
    assert aux.loss.item() == pytest.approx(0.01 * aux.losses["balance_loss"].item() + 0.1 * aux.losses["z_loss"].item())
    stats = moe.stats()
    assert stats["tokens"] == 30 and stats["load"].sum().item() == pytest.approx(1.0)
    moe.eval()
    moe(x)
    assert moe.stats()["tokens"] == 0  # counters move in training only


def test_shared_experts_always_run():
    moe = make_moe(top_k=1, num_shared_experts=1)
    x = torch.randn(10, D)
    with torch.no_grad():
        y, _ = moe(x)
        assert torch.allclose(y - moe.expert_pool.shared(x), moe.loop_reference(x, moe.router(x)), atol=1e-5)


def test_bf16_autocast_runs():
    moe = make_moe(top_k=2)
    x = torch.randn(33, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert aux.losses["balance_loss"].dtype == torch.float32  # router math stays fp32
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
