import pytest

import vidmoe
from vidmoe.config import ConfigError, config_to_dict, load_config, save_config

from conftest import CONFIGS


@pytest.mark.parametrize("name", ["tiny", "bouncing_small", "dense_flops", "dense_params", "folder_64"])
def test_shipped_configs_load(name):
    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    cfg = vidmoe.load_config(path)
    assert cfg.model.num_frames % cfg.model.temporal_patch_size == 0


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.moe.top_k=1", "train.lr=3e-4", "model.sample_size=[16, 32]",
                                              "model.moe.capacity_factor=1.25", "model.moe.capacity_factor=null"])
    assert cfg.model.moe.top_k == 1
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.frame_size == (16, 32)
    assert cfg.model.moe.capacity_factor is None


def test_ints_are_accepted_as_floats():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("override, words", [
    (["model.moe.topk=2"], "unknown config key 'model.moe.topk'"),
    (["modle.depth=2"], "unknown config key 'modle'"),
    (["model.depth=two"], "model.depth: expected an integer"),
    (["model.text=3"], "model.text: expected true or false"),
    (["model.moe.top_k=99"], "top_k=99"),
    (["model.sample_size=30"], "not divisible by model.patch_size"),
    (["model.num_frames=5", "model.temporal_patch_size=2"], "num_frames=5 is not divisible"),
    (["model.moe.router=expert"], "model.moe.router must be one of"),
    (["train.export_weights=last"], "train.export_weights must be ema or raw"),
    (["model.depth"], "not of the form section.key=value"),
    (["model.depth.x=1"], "'depth' is not a section"),
])
def test_bad_configs_fail_with_one_clear_line(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", override)
    message = str(err.value)
    assert words in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.moe.num_experts=6", "model.vocab=[red, circle]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert config_to_dict(load_config(tmp_path / "c.yaml")) == config_to_dict(cfg)


def test_string_fields_keep_yaml_keywords_from_the_command_line():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ['train.mixed_precision="no"']).train.mixed_precision == "no"
    assert load_config(None, ["model.vae=null"]).model.vae is None
    with pytest.raises(ConfigError, match="quote it"):
        vidmoe.config.config_from_dict({"train": {"mixed_precision": False}})


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "no"),
    ({"avx512f"}, "no"),  # no bf16 instructions: bf16 is emulated
    ({"avx512f", "avx512_bf16"}, "bf16"),  # without AMX tiles (an AMD EPYC): faster than fp32 too
    ({"amx_tile", "amx_bf16"}, "bf16"),
    (set(), "no"),
])
def test_auto_precision_on_cpu_takes_bf16_only_with_bf16_instructions(monkeypatch, flags, expected):
    from vidmoe import precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        assert precision.resolve_mixed_precision("auto", "cpu") == expected
        assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"  # asked for: always honoured
        assert precision.resolve_mixed_precision("no", "cpu") == "no"
    finally:
        precision.cpu_has_fast_bf16.cache_clear()
