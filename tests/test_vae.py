"""Latent mode: a tiny random AutoencoderKL encodes frames for training and decodes generated clips."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vidmoe.config import ConfigError, load_config
from vidmoe.diffusion import load_vae, vae_decode, vae_encode
from vidmoe.generate import generate
from vidmoe.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)  # two levels: 2x downsampling
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def latent_overrides(vae_dir, *extra):
    return [f"model.vae={vae_dir}", "model.vae_channels=4", "model.vae_scale=2", "model.patch_size=2", *extra]


def test_vae_encode_decode_shapes(vae_dir):
    cfg = load_config(TINY, latent_overrides(vae_dir))
    vae = load_vae(cfg.model)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    z = vae_encode(vae, video)
    assert z.shape == (2, 4, 4, 8, 8)
    assert vae_decode(vae, z).shape == video.shape


def test_vae_config_mismatch_is_a_config_error(vae_dir):
    cfg = load_config(TINY, latent_overrides(vae_dir, "model.vae_scale=4", "model.patch_size=4"))
    with pytest.raises(ConfigError, match="vae_scale"):
        load_vae(cfg.model)
    cfg = load_config(TINY, latent_overrides(vae_dir, "model.vae_channels=8"))
    with pytest.raises(ConfigError, match="latent channels"):
        load_vae(cfg.model)


@pytest.mark.slow
def test_trains_and_generates_in_latent_space(vae_dir, tmp_path):
    run = tmp_path / "run"
    train(load_config(TINY, latent_overrides(vae_dir, f"train.output_dir={run}", 'train.mixed_precision="no"',
                                             "train.max_steps=3", "train.checkpoint_every=0", "train.sample_every=3")))
    assert (run / "model" / "vae" / "config.json").is_file()  # the export carries its VAE
    assert (run / "samples" / "step-0000003.gif").is_file()
    videos = generate(run / "model", num_videos=1, steps=2, device="cpu")
    assert videos.shape == (1, 4, 16, 16, 3) and videos.dtype == torch.uint8
