"""Bad input at every entry point: exit status 2, one line on stderr that says what is wrong, no traceback."""

import os
import subprocess
import sys

import pytest

from vidmoe.cli import main

from conftest import CONFIGS, ROOT

TINY = str(CONFIGS / "tiny.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_clear_line(code, err, *words):
    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]


@pytest.fixture
def not_a_model(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


@pytest.mark.parametrize("overrides, words", [
    (["model.moe.topk=2"], ["unknown config key 'model.moe.topk'"]),
    (["model.moe.top_k=99"], ["top_k=99", "num_experts"]),
    (["model.depth=two"], ["model.depth", "integer"]),
    (["model.sample_size=18"], ["not divisible by model.patch_size"]),
    (["model.num_frames=5", "model.temporal_patch_size=2"], ["num_frames=5"]),
])
def test_train_rejects_bad_configs(capsys, tmp_path, overrides, words):
    code, err = run_cli(capsys, "train", "--config", TINY, f"train.output_dir={tmp_path / 'run'}", *overrides)
    assert_one_clear_line(code, err, *words)
    assert not (tmp_path / "run").exists()  # nothing written


def test_train_rejects_a_missing_config(capsys, tmp_path):
    assert_one_clear_line(*run_cli(capsys, "train", "--config", str(tmp_path / "missing.yaml")), "not found")


@pytest.mark.parametrize("command", ["generate", "inspect", "eval"])
def test_model_commands_reject_a_folder_that_is_no_model(capsys, tmp_path, not_a_model, command):
    code, err = run_cli(capsys, command, "--model", str(not_a_model), "--out", str(tmp_path / "out"))
    assert_one_clear_line(code, err, "not a vidmoe model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "inspect", "eval"])
def test_model_commands_reject_a_missing_folder(capsys, tmp_path, command):
    code, err = run_cli(capsys, command, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert_one_clear_line(code, err, "does not exist")


def test_prepare_rejects_a_missing_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "prepare", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cache"))
    assert_one_clear_line(code, err)


def test_prepare_rejects_an_unknown_synthetic_set(capsys, tmp_path):
    code, err = run_cli(capsys, "prepare", "--data", "synthetic:nope", "--num-clips", "2", "--out", str(tmp_path / "o"))
    assert_one_clear_line(code, err, "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_train_rejects_an_output_folder_it_cannot_write(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = run_cli(capsys, "train", "--config", TINY, f"train.output_dir={locked / 'run'}")
    assert_one_clear_line(code, err, "cannot write")


def test_train_rejects_an_output_path_that_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "train", "--config", TINY, f"train.output_dir={blocker / 'run'}")
    assert_one_clear_line(code, err, "cannot write")


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "{model}", "--out", "{out}"],
    ["eval", "--model", "{model}", "--out", "{out}"],
    ["inspect", "--model", "{model}", "--out", "{out}"],
    ["prepare", "--data", "synthetic:bouncing_shapes", "--num-clips", "2", "--out", "{out}"],
    ["bench", "--size", "tiny", "--out", "{out}/bench.json"],
])
def test_commands_reject_an_output_path_under_a_file_before_working(capsys, tmp_path, not_a_model, argv):
    # The output check comes first: a model folder that is none would otherwise be the error.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a.format(model=not_a_model, out=blocker / "out") for a in argv]
    assert_one_clear_line(*run_cli(capsys, *argv), "cannot write", str(blocker))


def test_bench_rejects_an_output_that_is_a_folder(capsys, tmp_path):
    assert_one_clear_line(*run_cli(capsys, "bench", "--size", "tiny", "--out", str(tmp_path)), "is a folder")


def test_bench_rejects_unknown_sections(capsys, tmp_path):
    code, err = run_cli(capsys, "bench", "--sections", "nope", "--out", str(tmp_path / "b.json"))
    assert_one_clear_line(code, err, "nope")


def test_unknown_command_and_help():
    assert main(["--help"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_real_command_line_has_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "vidmoe", "train", "--config", TINY, "model.moe.top_k=99"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vidmoe train: error: model.moe.top_k=99 must be between 1 and model.moe.num_experts=4"]
