"""vidmoe bench: every section runs at the tiny size and writes its keys (no timing assertions)."""

import json
import math

import pytest
import torch

from vidmoe.bench import (SIZES, TARGETS, check_targets, format_table, interleaved, latte_config,
                          latte_dense_variants, latte_matched_config, model_configs)
from vidmoe.cli import main

SECTION_KEYS = {
    "moe_layer": ["grouped_s", "loop_s", "dense_flops_s", "dense_params_s", "grouped_over_dense_flops",
                  "loop_over_grouped", "expert_choice_s", "expert_choice_over_dense_flops"],
    "model_step": ["moe_over_dense_flops", "moe_over_dense_params", "moe_s", "dense_flops_s", "dense_params_s",
                   "moe_expert_choice_over_dense_flops"],
    "generation": ["moe_step_over_dense_flops", "moe_clip_over_dense_flops"],
    "peer": ["latte_s", "ours_s", "ours_over_latte", "ours_latte_matched_s", "ours_latte_matched_over_latte",
             "ours_dense_latte_matched_over_latte", "ours_dense_latte_matched_no_qk_norm_over_latte",
             "ours_dense_latte_matched_no_qk_norm_no_refine_over_latte"],
    "data": ["cache_clips_per_s", "decode_clips_per_s", "train_clips_per_s", "cache_over_train"],
}
MODEL_KEYS = ["step_s", "clips_per_s", "peak_memory_mb", "params_total", "params_active"]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["precision"] in ("no", "bf16") and machine["device"] == "cpu"
    assert {"cpu", "torch_threads", "torch", "fast_bf16"} <= set(machine)
    for section, keys in SECTION_KEYS.items():
        for key in keys:
            assert positive(result["sections"][section][key]), (section, key)
    assert all(key in result["sections"]["model_step"]["models"]["moe_expert_choice"] for key in MODEL_KEYS)
    for name in ("moe", "dense_flops", "dense_params"):
        entry = result["sections"]["model_step"]["models"][name]
        assert all(key in entry for key in MODEL_KEYS)
        assert {"step_s", "clip_s"} <= set(result["sections"]["generation"]["models"][name])
    counts = {n: result["sections"]["model_step"]["models"][n]["params_total"] for n in ("moe", "dense_params")}
    assert abs(counts["moe"] - counts["dense_params"]) / counts["moe"] < 0.05  # parameter-matched
    assert len(result["targets"]) == len(TARGETS)
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    for t in result["targets"]:  # one repeat: its ratio is the ratio of the medians
        if t["key"] != "cache_over_train":
            assert t["repeats"] == 1 and t["repeat_range"][0] == pytest.approx(t["measured"]), t["key"]
            assert t["met_in_repeats"] == int(t["met"])
    printed = capsys.readouterr()
    assert "targets:" in printed.out and "[bench 5/5] data" in printed.err
    assert all(t.text in printed.out for t in TARGETS)


def test_candidates_take_turns_after_warm_up():
    calls = []
    times = interleaved({name: (lambda n=name: calls.append(n)) for name in "ABC"}, repeats=2, warmup=1,
                        device=torch.device("cpu"))
    assert calls == list("ABC") * 3
    assert {name: len(t) for name, t in times.items()} == {"A": 2, "B": 2, "C": 2}


def test_unknown_section_is_a_usage_error(capsys):
    assert main(["bench", "--sections", "moe_layer,nope", "--size", "tiny"]) == 2
    assert "unknown bench section 'nope'" in capsys.readouterr().err


def test_latte_matches_width_depth_heads_patch_and_frames():
    from diffusers import LatteTransformer3DModel

    cfg = model_configs(SIZES["tiny"])["moe"].model
    args = latte_config(cfg)
    latte = LatteTransformer3DModel(**args)
    assert len(latte.transformer_blocks) == len(latte.temporal_transformer_blocks) == cfg.depth
    assert args["num_attention_heads"] * args["attention_head_dim"] == cfg.hidden_size
    x = torch.randn(1, cfg.latent_channels, cfg.num_frames, *cfg.latent_size)
    text = torch.randn(1, cfg.text_max_length, cfg.hidden_size)
    assert latte(x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample.shape == x.shape


def test_table_says_when_a_section_was_not_measured_or_skipped():
    result = {"size": "tiny", "repeats": 1, "sections": {}, "targets": [],
              "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "device": "cpu", "fast_bf16": False,
                          "precision": "no", "load_average": None}}
    result["sections"] = {"peer": {"skipped": "the Latte comparison needs square frames"}}
    result["targets"] = check_targets(result["sections"])
    table = format_table(result)
    assert table.count("not measured") == len(TARGETS)
    assert "needs square frames" in table


def test_targets_count_the_repeats_that_meet_them():
    samples = {"moe": [1.0, 1.2, 1.1], "dense_flops": [1.0, 1.0, 1.0], "dense_params": [2.0, 2.0, 1.0]}
    section = {"samples": samples, "moe_over_dense_flops": 1.1, "moe_over_dense_params": 0.55}
    targets = {t["key"]: t for t in check_targets({"model_step": section})}
    flops, params = targets["moe_over_dense_flops"], targets["moe_over_dense_params"]
    assert flops["met"] and flops["repeat_range"] == [1.0, 1.2] and (flops["met_in_repeats"], flops["repeats"]) == (2, 3)
    assert params["met"] and params["repeat_range"] == [0.5, 1.1] and params["met_in_repeats"] == 2
    assert "repeat_range" not in targets["grouped_over_dense_flops"]  # moe_layer not measured
    result = {"size": "tiny", "repeats": 3, "sections": {}, "targets": list(targets.values()),  # the targets alone
              "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "device": "cpu", "fast_bf16": False,
                          "precision": "no", "load_average": None}}
    assert "repeats 1.00-1.20, met in 2 of 3" in format_table(result)


@pytest.mark.parametrize("repeats", [4, 5])
def test_repeat_ratios_bound_the_ratio_of_medians(repeats):
    from statistics import median

    from vidmoe.bench import repeat_ratios

    generator = torch.Generator().manual_seed(repeats)
    for _ in range(50):
        a, b = (torch.rand(repeats, generator=generator).add(0.1).tolist() for _ in range(2))
        ratios = repeat_ratios({"a": a, "b": b}, ("a", "b"))
        assert min(ratios) - 1e-12 <= median(a) / median(b) <= max(ratios) + 1e-12


def test_latte_sees_the_same_tokens_with_temporal_patches():
    from diffusers import LatteTransformer3DModel

    from vidmoe.bench import fold_time

    cfg = model_configs(SIZES["tiny"])["moe"].model
    cfg.temporal_patch_size = 2
    x = torch.randn(1, cfg.latent_channels, cfg.num_frames, *cfg.latent_size)
    folded = fold_time(x, 2)
    assert folded.shape == (1, 2 * cfg.latent_channels, cfg.num_frames // 2, *cfg.latent_size)
    assert torch.equal(folded[0, cfg.latent_channels:, 0], x[0, :, 1])  # frame 1 is the second channel group
    latte = LatteTransformer3DModel(**latte_config(cfg))
    text = torch.randn(1, cfg.text_max_length, cfg.hidden_size)
    assert latte(folded, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample.shape == folded.shape


def test_latte_matched_model_has_lattes_feed_forward_compute_and_spatial_cross_attention():
    from diffusers import LatteTransformer3DModel

    from vidmoe.model import build_model

    size = SIZES["full"]
    cfg = model_configs(size)["moe"]
    matched = build_model(latte_matched_config(size, cfg).model)
    latte = LatteTransformer3DModel(**latte_config(cfg.model))
    ffn = latte.transformer_blocks[0].ff
    latte_ffn = sum(m.weight.numel() for m in ffn.modules() if isinstance(m, torch.nn.Linear))
    experts = matched.spatial_blocks[0].ffn.experts
    per_token = cfg.model.moe.top_k * (experts.w_in[0].numel() + experts.w_out[0].numel())
    # Multiply-adds per token: top-k SwiGLU experts = one GELU MLP of 4x width, up to rounding the expert
    # width to a multiple of 16 (at width 128: 176 for an exact 170.7, 3% over).
    step = cfg.model.moe.top_k * 3 * cfg.model.hidden_size * 8  # half of one rounding step of 16
    assert abs(per_token - latte_ffn) <= step
    assert all(b.cross_attn is not None for b in matched.spatial_blocks)
    assert all(b.cross_attn is None for b in matched.temporal_blocks)
    assert latte.temporal_transformer_blocks[0].attn2 is None  # Latte's temporal blocks have no text either


def test_latte_dense_variants_take_away_one_difference_at_a_time():
    from vidmoe.model import build_model

    size = SIZES["full"]
    cfg = model_configs(size)["moe"]
    models = [build_model(c.model) for c in latte_dense_variants(size, cfg).values()]
    assert len(models) == 3
    has_qk_norm = [isinstance(m.spatial_blocks[0].attn.q_norm, torch.nn.RMSNorm) for m in models]
    has_refiner = [m.refiner is not None for m in models]
    assert has_qk_norm == [True, False, False]
    assert has_refiner == [True, True, False]
    assert all(m.parameter_counts()["total"] == m.parameter_counts()["active"] for m in models)  # dense


@pytest.mark.slow
def test_compile_section_runs_only_when_named(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--repeats", "1", "--device", "cpu", "--sections", "compile",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sections_run"] == ["compile"]
    section = result["sections"]["compile"]
    for key in ("eager_s", "compiled_s", "compiled_over_eager", "first_step_s", "dense_flops_compiled_s",
                "compiled_moe_over_dense_flops"):
        assert positive(section[key]), key


@pytest.mark.parametrize("low_noise_from, blurs", [(0.0, True), (0.8, False)])
def test_bench_step_draws_soft_edges_only_if_a_run_starts_with_them(monkeypatch, low_noise_from, blurs):
    import importlib

    from vidmoe.bench import _batch, training_step
    from vidmoe.model import build_model

    size = SIZES["tiny"]
    cfg = model_configs(size)["moe"]
    cfg.train.blur_prob, cfg.train.low_noise_from = 1.0, low_noise_from
    train_module = importlib.import_module("vidmoe.train")  # the package's `train` is the function
    calls = []
    real = train_module.soft_edge_source

    def counting(x0, t, train_cfg):
        calls.append(t)
        return real(x0, t, train_cfg)

    monkeypatch.setattr(train_module, "soft_edge_source", counting)
    torch.manual_seed(0)
    training_step(build_model(cfg.model), cfg, _batch(cfg, 4, torch.device("cpu")), torch.device("cpu"), "no")()
    assert len(calls) == (1 if blurs else 0)
