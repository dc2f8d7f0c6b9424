"""Random input for the parsers: configs end in a Config or a ConfigError, videos in frames or a VideoReadError."""

import dataclasses
import time
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vidmoe.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from vidmoe.video_io import VideoReadError, iter_frames, probe_video, read_frames, read_video, write_video

from conftest import CONFIGS
from helpers_video import pattern

TINY = CONFIGS / "tiny.yaml"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- configs


def field_paths(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf of the config as a dotted path -> its annotation, e.g. 'model.moe.top_k' -> int."""
    paths = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            paths.update(field_paths(tp, f"{prefix}{name}."))
        else:
            paths[f"{prefix}{name}"] = tp
    return paths


PATHS = field_paths()
SECTIONS = sorted({path.rsplit(".", 1)[0] for path in PATHS})
# Values near the edges of what validation checks (0, negatives, odd sizes), YAML's special words and broken YAML.
RAW_VALUES = st.one_of(
    st.integers(-3, 70).map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(["0", "-1", "0.0", "1e-3", "1.0e-3", ".inf", "-.inf", ".nan", "1" * 400, "0x10", "true", "no",
                     "null", "~", "", "[]", "{}", "[8, 8]", "[0, 16]", "[1, 2, 3]", "[a", "{a: 1}", "'no'", "- x",
                     "!!binary aGk=", "!!python/object:os.system x", "2024-01-01", "moe", "dense", "flops",
                     "token_choice", "expert_choice", "bias", "none", "center", "random", "a: b: c", "\t", "\x00"]),
    st.text(max_size=12),
)
KEYS = st.one_of(st.sampled_from(sorted(PATHS) + SECTIONS), st.text(max_size=12))
OVERRIDES = st.one_of(st.builds(lambda key, value: f"{key}={value}", KEYS, RAW_VALUES), st.text(max_size=20))


def assert_config_or_config_error(build) -> typing.Optional[Config]:
    try:
        cfg = build()
    except ConfigError as err:
        assert str(err)
        return None
    assert isinstance(cfg, Config)
    return cfg


@FUZZ
@given(overrides=st.lists(OVERRIDES, max_size=5))
# what earlier runs found: a division by a size of 0, numbers too large for a float or for int()
@example(overrides=["model.patch_size=0"])
@example(overrides=["model.temporal_patch_size=0"])
@example(overrides=["model.vae=some/vae", "model.vae_scale=0"])
@example(overrides=["train.lr=" + "1" * 400])
@example(overrides=["model.depth=" + "9" * 5000])
def test_random_overrides_give_a_config_or_a_config_error(overrides):
    assert_config_or_config_error(lambda: load_config(TINY, overrides))


def leaf_values(tp) -> st.SearchStrategy:
    """Values of the right type most of the time (to get past type checks into validation), anything else too."""
    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                st.text(max_size=6) | st.integers() | st.none(), inner, max_size=3),
                            max_leaves=6)
    typed = {int: st.integers(-2, 64), float: st.floats(), bool: st.booleans(), str: st.text(max_size=8)}
    options = [typed[t] for t in typing.get_args(tp) or (tp,) if t in typed]
    if typing.get_origin(tp) is list or any(typing.get_origin(t) is list for t in typing.get_args(tp)):
        options.append(st.lists(st.integers(-2, 64) | st.floats(), max_size=3))
    return st.one_of(*options, anything)


def section_dicts(cls: type) -> st.SearchStrategy:
    """A YAML-like mapping for one config section: some known keys with random values, sometimes an unknown key."""
    known = {}
    for name, tp in typing.get_type_hints(cls).items():
        known[name] = section_dicts(tp) if dataclasses.is_dataclass(tp) else leaf_values(tp)
    mapping = st.fixed_dictionaries({}, optional=known)
    unknown = st.dictionaries(st.text(max_size=6) | st.integers() | st.none(), st.integers(), max_size=1)
    return st.one_of(mapping, st.builds(lambda a, b: {**a, **b}, mapping, unknown), leaf_values(typing.Any))


@FUZZ
@given(data=section_dicts(Config))
@example(data={"model": {"depth": 2, 1: 2, None: 0}})  # YAML keys that are not strings
@example(data={"model": {"num_heads": 0}})
def test_random_yaml_mappings_give_a_config_or_a_config_error(data, tmp_path):
    cfg = assert_config_or_config_error(lambda: config_from_dict(data))
    if cfg is not None:  # what a run saves, it loads back unchanged
        save_config(cfg, tmp_path / "saved.yaml")
        saved = yaml.safe_dump(config_to_dict(cfg))  # compared as text: NaN != NaN
        assert yaml.safe_dump(config_to_dict(load_config(tmp_path / "saved.yaml"))) == saved
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_config_or_config_error(lambda: load_config(path))


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(content=b"\x80")  # not UTF-8
@example(content=b"train:\n  max_steps: " + b"9" * 5000)
def test_random_config_files_give_a_config_or_a_config_error(content, tmp_path):
    path = tmp_path / "random.yaml"
    path.write_bytes(content)
    assert_config_or_config_error(lambda: load_config(path))


# ----------------------------------------------------------------------------- videos


@pytest.fixture(scope="module")
def real_videos(tmp_path_factory) -> dict[str, bytes]:
    """Small real files of each written format, as bytes."""
    folder = tmp_path_factory.mktemp("real")
    frames = pattern(6, 16, 16)
    return {suffix: write_video(folder / f"clip{suffix}", frames, upscale=1).read_bytes()
            for suffix in (".mp4", ".webm", ".avi", ".gif")}


SUFFIXES = st.sampled_from([".mp4", ".webm", ".avi", ".gif", ".mkv", ".mov", ".mpg", ".ts", ".txt", ""])


def assert_frames_or_read_error(path) -> typing.Optional[np.ndarray]:
    """Every reader entry point ends in frames or VideoReadError with a reason."""
    try:
        frames, fps = read_video(path, timeout=5.0)
    except VideoReadError as err:
        assert err.reason
        frames = None
    else:
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[0] >= 1 and frames.shape[-1] == 3
        assert isinstance(fps, float)
    try:
        info = probe_video(path, timeout=5.0)
        picked = read_frames(path, [0, info.num_frames - 1], info, timeout=5.0)
    except VideoReadError as err:
        assert err.reason
    else:
        assert picked.dtype == np.uint8 and picked.shape[:1] == (2,) and picked.shape[-1] == 3
    return frames


@FUZZ
@given(content=st.binary(max_size=2048), suffix=SUFFIXES)
def test_random_bytes(content, suffix, tmp_path):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(content)
    assert_frames_or_read_error(path)


@FUZZ
@given(kind=st.sampled_from([".mp4", ".webm", ".avi", ".gif"]), cut=st.floats(0, 1), suffix=SUFFIXES)
def test_truncated_real_files(real_videos, kind, cut, suffix, tmp_path):
    content = real_videos[kind]
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(content[:int(cut * len(content))])
    assert_frames_or_read_error(path)


@FUZZ
@given(kind=st.sampled_from([".mp4", ".webm", ".avi", ".gif"]),
       changes=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_real_files(real_videos, kind, changes, tmp_path):
    content = bytearray(real_videos[kind])
    for where, value in changes:
        content[min(int(where * len(content)), len(content) - 1)] = value
    path = tmp_path / f"damaged{kind}"
    path.write_bytes(bytes(content))
    assert_frames_or_read_error(path)


@pytest.mark.parametrize("kind", [".mp4", ".webm", ".avi", ".gif"])
@pytest.mark.parametrize("suffix", [".avi", ".gif", ".txt", ""])
def test_a_wrong_extension_still_reads_the_same_frames(real_videos, kind, suffix, tmp_path):
    (tmp_path / f"right{kind}").write_bytes(real_videos[kind])
    (tmp_path / f"wrong{suffix}").write_bytes(real_videos[kind])
    expected, _ = read_video(tmp_path / f"right{kind}")
    np.testing.assert_array_equal(assert_frames_or_read_error(tmp_path / f"wrong{suffix}"), expected)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", pattern(120, 32, 32), upscale=2)


def test_a_tiny_time_limit_stops_a_long_file(long_video):
    assert read_video(long_video)[0].shape[0] == 120  # readable in full with the default limit
    for read in (read_video, probe_video):
        with pytest.raises(VideoReadError, match="decode_timeout"):
            read(long_video, timeout=1e-4)


def test_the_time_limit_cuts_off_a_file_that_keeps_decoding(long_video):
    """A consumer slower than the limit stands in for a file that decodes forever: reading stops midway."""
    seen = 0
    with pytest.raises(VideoReadError, match="decode_timeout"):
        for _ in iter_frames(long_video, timeout=0.5):
            seen += 1
            time.sleep(0.1)
    assert seen < 120
