import pytest
import torch

import vidmoe
from vidmoe.model import (MIN_VELOCITY_T, VidMoETransformer, build_model, edm_coefficients, from_sequences,
                          to_sequences)

from conftest import CONFIGS

TINY = CONFIGS / "tiny.yaml"
VOCAB = "model.vocab=[a, red, blue, circle, square, bouncing, and]"


def tiny(*overrides):
    return vidmoe.load_config(TINY, [VOCAB, *overrides]).model


def perturbed(model):
    """A model whose zero-initialised branches have been moved, so outputs depend on everything."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(cfg, batch=2):
    torch.manual_seed(0)
    h, w = cfg.latent_size
    x = torch.randn(batch, cfg.latent_channels, cfg.num_frames, h, w)
    return x, torch.rand(batch)


@pytest.mark.parametrize("frames, size, patch, tpatch", [
    (4, 16, 4, 1), (4, [8, 16], 4, 2), (6, [12, 8], 2, 3), (2, 8, 8, 1),
])
def test_output_shape(frames, size, patch, tpatch):
    cfg = tiny(f"model.num_frames={frames}", f"model.sample_size={size}", f"model.patch_size={patch}",
               f"model.temporal_patch_size={tpatch}")
    model = perturbed(build_model(cfg))
    x, t = inputs(cfg)
    out = model(x, t, labels=torch.tensor([0, 2]), captions=["a red circle", "a blue square"])
    assert out.sample.shape == x.shape
    assert torch.isfinite(out.sample).all()


def test_sequence_regrouping_round_trips():
    x = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)  # [B, T, S, D]
    assert to_sequences(x, "spatial")[4].tolist() == x[1, 1].tolist()  # sequence (b=1, t=1): a frame
    assert to_sequences(x, "temporal")[5].tolist() == x[1, :, 1].tolist()  # (b=1, s=1): one position over time
    for kind in ("spatial", "temporal"):
        assert torch.equal(from_sequences(to_sequences(x, kind), kind, 2, 3, 4), x)


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_untrained_model_predicts_exact_zero(ffn):
    """adaLN-Zero: the head starts at zero, so a velocity model outputs 0, an x0 model x_t / t and an
    edm model its skip connection's velocity."""
    x, t = inputs(tiny())
    t[0] = 0.01  # below MIN_VELOCITY_T: divided by the clamp instead
    for prediction, refine in (("velocity", 0), ("x0", 0), ("x0", 8), ("edm", 0)):
        cfg = tiny(f"model.ffn={ffn}", f"model.prediction={prediction}", f"model.refine_channels={refine}")
        out = build_model(cfg)(x, t, labels=torch.tensor([1, 2]), captions=["a red circle", ""])
        if prediction == "velocity":
            assert torch.count_nonzero(out.sample) == 0
        elif prediction == "edm":
            torch.testing.assert_close(out.sample, edm_coefficients(t, cfg.sigma_data)[1] * x, rtol=1e-6, atol=0)
        else:
            expected = x / t.clamp(min=MIN_VELOCITY_T).view(-1, 1, 1, 1, 1)
            torch.testing.assert_close(out.sample, expected, rtol=1e-6, atol=0)
            assert torch.equal(out.sample[0], x[0] / MIN_VELOCITY_T)


def test_x0_and_velocity_heads_describe_the_same_flow():
    """An x0 head and a velocity head whose outputs agree on x0 give the same velocity."""
    cfg = tiny("model.prediction=x0")
    model = perturbed(build_model(cfg)).eval()
    x, t = inputs(cfg)
    kwargs = dict(labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"])
    with torch.no_grad():
        v = model(x, t, **kwargs).sample
        model.cfg.prediction = "velocity"
        x0 = model(x, t, **kwargs).sample  # the raw head: the x0 estimate
    torch.testing.assert_close(v, (x - x0) / t.view(-1, 1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x - t.view(-1, 1, 1, 1, 1) * v, x0, rtol=1e-5, atol=1e-5)


def test_refiner_is_a_per_frame_convolution_of_head_input_and_noise_level():
    """The refined x0 is the token head's x0 plus 3x3 / 1x1 / 3x3 convolutions of [x0, x_t, t] frame by frame,
    written here as 3D convolutions with a temporal kernel of 1."""
    cfg = tiny("model.refine_channels=8")
    model = perturbed(build_model(cfg)).eval()
    x, t = inputs(cfg)
    kwargs = dict(labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"])
    with torch.no_grad():
        refined = x - t.view(-1, 1, 1, 1, 1) * model(x, t, **kwargs).sample
        refiner, model.refiner = model.refiner, None
        head = x - t.view(-1, 1, 1, 1, 1) * model(x, t, **kwargs).sample
        level = t.view(-1, 1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        h = torch.cat([head, x, level], dim=1)
        for i, conv in enumerate(c for c in refiner.net if isinstance(c, torch.nn.Conv2d)):
            h = torch.nn.functional.conv3d(h, conv.weight.unsqueeze(2), conv.bias, padding=(0, *conv.padding))
            h = torch.nn.functional.silu(h) if i < 2 else h
    torch.testing.assert_close(refined, head + h, rtol=1e-4, atol=1e-4)


def test_refiner_learns_to_copy_a_clean_input():
    """Near t = 0 the refiner can pass the input's hard edges through: trained alone for a few steps on
    step-edged clips at t = 0.02 with the token head giving a blurred guess, its x0 error falls."""
    torch.manual_seed(0)
    cfg = tiny("model.refine_channels=16")
    refiner = build_model(cfg).refiner
    clean = (torch.rand(4, 3, 4, 16, 16) > 0.5).float() * 2 - 1  # hard-edged pixels
    t = torch.full((4,), 0.02)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1, 1) * torch.randn_like(clean)
    blurred = torch.nn.functional.avg_pool3d(clean, (1, 3, 3), stride=1, padding=(0, 1, 1))
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (refiner(blurred, x_t, t) - clean).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_edm_head_is_the_preconditioned_x0_estimate():
    """The edm velocity is (x_t - x0) / t for x0 = c_skip x_t + c_out F(c_in x_t), written out as in Karras et al."""
    cfg = tiny("model.prediction=edm", "model.sigma_data=0.8")
    model = perturbed(build_model(cfg)).eval()
    x, t = inputs(cfg)
    kwargs = dict(labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"])
    sd, tt = 0.8, t.view(-1, 1, 1, 1, 1)
    var = (1 - tt) ** 2 * sd ** 2 + tt ** 2
    c_in, c_skip, c_out = var.rsqrt(), (1 - tt) * sd ** 2 / var, tt * sd / var.sqrt()
    with torch.no_grad():
        v = model(x, t, **kwargs).sample
        model.cfg.prediction = "velocity"
        f = model(c_in * x, t, **kwargs).sample  # the raw head F on the scaled input
    torch.testing.assert_close(v, (x - (c_skip * x + c_out * f)) / tt, rtol=1e-4, atol=1e-4)
    # Bounded at both ends: at t = 1 the clip is sd * F; at t = 0 the velocity is finite.
    c_in, skip, out = edm_coefficients(torch.tensor([0.0, 1.0]), sd)
    assert torch.isfinite(skip).all() and torch.allclose(skip.flatten(), torch.tensor([-1.0, 1.0]))
    assert torch.allclose(out.flatten(), torch.tensor([1.0, sd])) and torch.allclose(c_in.flatten(), torch.tensor([1 / sd, 1.0]))


@pytest.mark.parametrize("refine", [0, 8])
def test_save_and_load_round_trip(tmp_path, refine):
    cfg = tiny(f"model.refine_channels={refine}")
    model = perturbed(build_model(cfg)).eval()
    with torch.no_grad():
        for _, ffn in model.moe_layers():
            ffn.router.selection_bias.uniform_(-0.1, 0.1)  # a persistent buffer must survive too
    model.save_pretrained(tmp_path)
    loaded = VidMoETransformer.from_pretrained(tmp_path).eval()
    x, t = inputs(cfg)
    kwargs = dict(labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square bouncing"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, **kwargs).sample, model(x, t, **kwargs).sample, rtol=0, atol=0)
    assert loaded.model_config.vocab == cfg.vocab


def test_captions_labels_and_time_change_the_output():
    cfg = tiny()
    model = perturbed(build_model(cfg)).eval()
    x, t = inputs(cfg)
    labels = torch.tensor([0, 1])
    caps = ["a red circle", "a red circle"]
    with torch.no_grad():
        base = model(x, t, labels=labels, captions=caps).sample
        other_caption = model(x, t, labels=labels, captions=["a blue square", "a blue square"]).sample
        other_label = model(x, t, labels=torch.tensor([2, 2]), captions=caps).sample
        other_time = model(x, t * 0.5, labels=labels, captions=caps).sample
        dropped = model(x, t, labels=labels, captions=caps, drop=torch.tensor([True, False])).sample
        null = model(x, t).sample
    for changed in (other_caption, other_label, other_time):
        assert (changed - base).abs().max() > 1e-4
    torch.testing.assert_close(dropped[0], null[0])  # dropping = the null condition
    torch.testing.assert_close(dropped[1], base[1])


def test_training_mode_drops_conditions_at_the_configured_rate():
    model = build_model(tiny("model.cond_dropout=0.5")).train()
    torch.manual_seed(0)
    dropped = torch.stack([model._drop_mask(64, None, torch.device("cpu")) for _ in range(20)]).float().mean()
    assert 0.4 < dropped.item() < 0.6
    assert not build_model(tiny()).eval()._drop_mask(64, None, torch.device("cpu")).any()


def test_every_parameter_gets_a_gradient():
    cfg = tiny("model.moe.num_experts=2", "model.moe.top_k=2")  # top-2 of 2: every expert sees tokens
    model = perturbed(build_model(cfg)).train()
    x, t = inputs(cfg)
    out = model(x, t, labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"],
                drop=torch.tensor([False, True]))
    (out.sample.square().mean() + out.aux.loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_shared_pool_routers_select_from_the_same_weights():
    model = build_model(tiny("model.moe.expert_pool=shared"))
    layers = dict(model.moe_layers())
    assert layers["blocks.0.spatial"].experts is layers["blocks.0.temporal"].experts
    assert layers["blocks.0.spatial"].router is not layers["blocks.0.temporal"].router
    assert layers["blocks.0.spatial"].experts is not layers["blocks.1.spatial"].experts
    names = [name for name, _ in model.named_parameters()]
    assert sum(n.endswith("experts.w_in") for n in names) == model.model_config.depth  # stored once per block
    split = dict(build_model(tiny("model.moe.expert_pool=split")).moe_layers())
    assert split["blocks.0.spatial"].experts is not split["blocks.0.temporal"].experts
    assert [(n, k) for n, k, _ in model.routers()][:2] == [("blocks.0.spatial", "spatial"), ("blocks.0.temporal", "temporal")]


def test_moe_stats_and_bias_updates_through_the_model():
    model = perturbed(build_model(tiny("model.moe.balance=bias"))).train()
    x, t = inputs(cfg := model.model_config)
    model(x, t)
    stats = model.moe_stats()
    assert set(stats) == {f"blocks.{i}.{k}" for i in range(cfg.depth) for k in ("spatial", "temporal")}
    tokens = x.shape[0] * cfg.num_frames * (cfg.latent_size[0] // cfg.patch_size) ** 2
    for s in stats.values():
        assert s["tokens"] == tokens and s["load"].sum().item() == pytest.approx(1.0)
    model.after_optimizer_step()
    biases = [ffn.router.selection_bias for _, ffn in model.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)


def test_bf16_autocast_runs():
    cfg = tiny()
    model = perturbed(build_model(cfg)).train()
    x, t = inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, captions=["a red circle", "a blue square"])
    (out.sample.float().square().mean() + out.aux.loss).backward()
    assert torch.isfinite(model.final_layer.linear.weight.grad).all()


@pytest.mark.parametrize("name", ["tiny", "bouncing_small"])
def test_dense_baselines_match_the_moe(name):
    moe = build_model(vidmoe.load_config(CONFIGS / f"{name}.yaml").model).parameter_counts()
    flops = build_model(vidmoe.load_config(CONFIGS / f"{name}.yaml", ["model.ffn=dense", "model.dense_match=flops"]).model)
    params = build_model(vidmoe.load_config(CONFIGS / f"{name}.yaml", ["model.ffn=dense", "model.dense_match=params"]).model)
    assert flops.parameter_counts()["active"] == pytest.approx(moe["active"], rel=0.02)
    assert params.parameter_counts()["total"] == pytest.approx(moe["total"], rel=0.02)


def test_shipped_dense_configs_and_parameter_ratio():
    counts = {n: build_model(vidmoe.load_config(CONFIGS / f"{n}.yaml").model).parameter_counts()
              for n in ("bouncing_small", "dense_flops", "dense_params")}
    # The MoE holds more than twice the parameters of the dense model of its compute (2.2x at width 128).
    assert counts["bouncing_small"]["total"] >= 2 * counts["dense_flops"]["total"]
    assert counts["dense_flops"]["active"] == pytest.approx(counts["bouncing_small"]["active"], rel=0.02)
    assert counts["dense_params"]["total"] == pytest.approx(counts["bouncing_small"]["total"], rel=0.02)


@pytest.mark.slow
def test_compiled_regions_match_the_eager_model():
    cfg = tiny()
    eager = perturbed(build_model(cfg)).eval()  # eval: no random condition dropout between the two
    compiled = build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t = inputs(cfg)
    results = []
    for model in (eager, compiled):
        out = model(x, t, labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"])
        (out.sample.square().mean() + out.aux.loss).backward()
        results.append((out.sample.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_checked_compile_falls_back_from_wrong_compiled_code(monkeypatch):
    """A compiled function that returns NaN is recompiled for 256-bit vectors, then run eager if still wrong."""
    from vidmoe import precision

    compiles = []

    def fake_compile(fn, dynamic=False, options=None, **kw):  # every compiled version gives NaN
        compiles.append(options)
        return lambda *args: tuple(out * float("nan") for out in fn(*args))

    monkeypatch.setattr(precision.torch, "compile", fake_compile)
    calls = []

    def fn(x, pair):
        calls.append(x.shape)
        return x * 2, pair[0] + 1

    checked = precision.CheckedCompile(fn)
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="wrong values") as record:
        out, other = checked(x, (x, None))
    assert len(record) == 2 and "running it eager" in str(record[1].message)
    assert compiles == [None, {"cpp.simdlen": 256}]
    torch.testing.assert_close(out, x * 2)
    torch.testing.assert_close(other, x + 1)
    calls.clear()
    checked(x, (x, None))  # checked signature, eager now: one call, no second eager reference
    assert calls == [x.shape]


def test_checked_compile_keeps_right_compiled_code(monkeypatch):
    from vidmoe import precision

    monkeypatch.setattr(precision.torch, "compile", lambda fn, **kw: lambda *args: fn(*args) + 1e-4)
    checked = precision.CheckedCompile(lambda x: x * 2)
    x = torch.ones(5)
    torch.testing.assert_close(checked(x), x * 2 + 1e-4)  # within rtol: the compiled result is kept
    assert checked.fallbacks == list(precision.FALLBACK_COMPILE_OPTIONS)


@pytest.mark.slow
def test_compiled_regions_in_bf16_match_the_eager_model_at_full_size():
    """bouncing_small's sub-blocks compiled under bf16 autocast (where one CPU's compiled code gave NaN)."""
    cfg = vidmoe.load_config(CONFIGS / "bouncing_small.yaml", [VOCAB]).model
    eager = perturbed(build_model(cfg)).eval()
    compiled = build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions()
    x, t = inputs(cfg)
    outs = []
    for model in (eager, compiled):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x, t, labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"]).sample)
    ref, got = (o.float() for o in outs)
    assert torch.isfinite(got).all()
    assert torch.linalg.vector_norm(got - ref) < 0.02 * torch.linalg.vector_norm(ref)


@pytest.mark.parametrize("masked", [False, True])
def test_written_out_attention_matches_the_fused_kernel(masked):
    """On CPUs in bf16 short sequences take the written-out path: it must agree with SDPA, values and grads."""
    from vidmoe import layers

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 8, requires_grad=True) for _ in range(3))
    mask = (torch.rand(3, 1, 1, 20) < 0.6) | (torch.arange(20) == 0) if masked else None  # key 0 always seen
    grad = torch.randn(3, 2, 20, 8)
    results = []
    for fn in (torch.nn.functional.scaled_dot_product_attention, layers.attention):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q, k, v, attn_mask=mask) if fn is not layers.attention else fn(q, k, v, mask)
        assert out.dtype == torch.bfloat16
        out.float().backward(grad)
        results.append((out.float(), [x.grad.clone() for x in (q, k, v)]))
        for x in (q, k, v):
            x.grad = None
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05)
    # Masked keys take no weight: changing their values leaves the output alone.
    if masked:
        v2 = v.detach().clone()
        v2[~mask.expand(3, 2, 20, 20)[:, :, 0, :]] += 10.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(layers.attention(q, k, v2, mask), got.to(torch.bfloat16))


def test_attention_takes_the_fused_kernel_in_fp32_and_for_long_sequences(monkeypatch):
    from vidmoe import layers

    calls = []
    fused = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    short, long = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 300, 8)
    layers.attention(short, short, short)  # fp32
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers.attention(short, short, short)  # bf16, 16 x 16 scores: written out
        assert len(calls) == 1
        layers.attention(long, long, long)  # 300 x 300 scores: past SMALL_ATTENTION
    assert len(calls) == 2


def test_exact_x0_velocity_trains_on_the_x0_error():
    """x0_velocity=exact: the velocity is (x_t - x0_hat) / t at every t, and the flow loss is the x0 error
    weighed by 1 / max(t, MIN_VELOCITY_T)^2; with the same weights, clamped differs only below MIN_VELOCITY_T."""
    from vidmoe.diffusion import add_noise, flow_loss

    exact = perturbed(build_model(tiny("model.x0_velocity=exact", "model.refine_channels=8"))).eval()
    clamped = build_model(tiny("model.refine_channels=8")).eval()
    clamped.load_state_dict(exact.state_dict())
    x0, _ = inputs(exact.cfg, batch=4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.002, 0.03, 0.05, 0.6])
    kwargs = dict(labels=torch.tensor([0, 1, 2, 0]), captions=["a red circle", "", "a blue square", "red"])
    with torch.no_grad():
        loss_exact, out = flow_loss(exact, x0, t, noise, **kwargs)
        loss_clamped, out_clamped = flow_loss(clamped, x0, t, noise, **kwargs)
    x_t = add_noise(x0, t, noise)
    x0_hat = x_t - t.view(-1, 1, 1, 1, 1) * out.sample  # the head's estimate, back from its velocity
    expected = (x0_hat - x0).square().flatten(1).mean(1) / t.clamp(min=MIN_VELOCITY_T) ** 2
    torch.testing.assert_close(loss_exact, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.sample[2:], out_clamped.sample[2:])
    torch.testing.assert_close(loss_exact[2:], loss_clamped[2:])
    assert out_clamped.loss_weight is None
    # below MIN_VELOCITY_T the clamped velocity is the same estimate divided by the clamp instead
    torch.testing.assert_close(out_clamped.sample[:2], (x_t[:2] - x0_hat[:2]) / MIN_VELOCITY_T, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.sample[:2], out_clamped.sample[:2], rtol=0.1)


def test_exact_x0_velocity_needs_an_x0_head():
    with pytest.raises(vidmoe.ConfigError, match="x0_velocity"):
        tiny("model.x0_velocity=exact", "model.prediction=velocity")


def test_self_conditioning_feeds_back_the_models_own_first_estimate():
    cfg = tiny("model.self_condition=true", "model.self_condition_prob=1.0", "model.cond_dropout=0")
    model = perturbed(build_model(cfg))
    assert model.patch_embed.proj.in_channels == 2 * cfg.latent_channels
    x, t = inputs(cfg)
    conditions = dict(labels=torch.tensor([0, 1]), captions=["a red circle", "a blue square"])
    with torch.no_grad():
        model.eval()
        plain = model(x, t, **conditions)
        zeros = model(x, t, self_cond=torch.zeros_like(x), **conditions)
        fed = model(x, t, self_cond=plain.x0, **conditions)
        model.train()
        first = model(x, t, self_cond=torch.zeros_like(x), **conditions)
        reference = model(x, t, self_cond=first.x0, **conditions)
    torch.testing.assert_close(plain.sample, zeros.sample)  # no estimate = zeros (in eval and sampling)
    assert (fed.sample - plain.sample).abs().max() > 1e-4  # the estimate is an input that matters
    # x0 is the estimate behind the velocity: x_t = x0 + t v
    torch.testing.assert_close(plain.x0 + t.view(-1, 1, 1, 1, 1) * plain.sample, x, atol=1e-4, rtol=1e-4)
    # In training (probability 1) the model feeds back its own first pass, and only the second pass learns.
    auto = model(x, t, **conditions)
    torch.testing.assert_close(auto.sample, reference.sample)
    auto.sample.square().mean().backward()
    assert model.patch_embed.proj.weight.grad[:, cfg.latent_channels:].abs().sum() > 0
    # Probability 0: the estimate is always zeros.
    model.cfg.self_condition_prob = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, **conditions).sample, first.sample)


def test_self_conditioning_draws_are_the_same_on_every_process():
    """Each training forward decides on a first pass from the model's own generator: two processes' replicas
    (built the same) make the same passes, which FSDP needs, at about the configured rate."""
    runs = []
    for seed in (0, 1):
        model = build_model(tiny("model.self_condition=true", "model.self_condition_prob=0.5")).train()
        calls = []
        model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
        x, t = inputs(model.cfg)
        torch.manual_seed(seed)  # the global generator differs, as with device-specific seeds
        passes = []
        with torch.no_grad():
            for _ in range(40):
                before = len(calls)
                model(x, t)
                passes.append(len(calls) - before)  # 2 with a first pass, else 1
        runs.append(passes)
    assert runs[0] == runs[1] and 10 <= runs[0].count(2) <= 30 and set(runs[0]) == {1, 2}
