"""Muon for hidden matrices beside AdamW: the update against torch's own Muon and AdamW, and in training."""

import torch
from torch import nn

from vidmoe.config import load_config
from vidmoe.model import build_model
from vidmoe.optim import MuonAdamW, muon_parameters, orthogonalize

from test_train import TINY


def test_orthogonalize_brings_singular_values_near_one_per_matrix():
    torch.manual_seed(0)
    # Ill-conditioned: singular values spread over three orders of magnitude, wide and tall.
    for shape in [(3, 32, 96), (3, 96, 32)]:
        u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
        s = torch.logspace(0, -3, min(shape[1:])).expand(shape[0], -1)
        g = u @ torch.diag_embed(s) @ v
        out = orthogonalize(g)
        assert out.shape == g.shape and out.dtype == g.dtype
        sv = torch.linalg.svdvals(out)
        # The quintic iteration lands in a band around 1 rather than on 1 (the tiniest values grow less).
        assert sv[:, : sv.shape[1] // 2].min() > 0.6 and sv.max() < 1.25
        # Batched is the same as one matrix at a time, and the singular vectors are the gradient's:
        # in the gradient's singular bases the result is diagonal.
        assert torch.allclose(out[1], orthogonalize(g[1]), atol=1e-6)
        core = u.mT @ out @ v.mT
        diagonal = torch.diagonal(core, dim1=-2, dim2=-1)
        off = (core - torch.diag_embed(diagonal)).abs()
        assert off.mean() < 0.01 and off.max() < 0.15  # bf16 rounding; other bases would give ~0.1 on average
        assert diagonal[:, : diagonal.shape[1] // 2].min() > 0.6


def _pair(seed: int):
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(48, 16)), nn.Parameter(torch.randn(16))


def test_muon_and_adamw_groups_match_torchs_optimizers():
    w, b = _pair(0)
    w_ref, b_ref = _pair(0)
    ours = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                     lr=0.02, betas=(0.9, 0.99))
    ref_muon = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([b_ref], lr=0.02, betas=(0.9, 0.99), weight_decay=0.0)
    start = w.detach().clone()
    for step in range(5):
        torch.manual_seed(100 + step)
        grads = torch.randn(48, 16), torch.randn(16)
        for p, q, g in zip((w, b), (w_ref, b_ref), grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref_muon.step()
        ref_adamw.step()
    # Both orthogonalise in bf16, so they agree to bf16's rounding, far inside the distance travelled.
    moved = (w_ref - start).abs().max()
    assert (w - w_ref).abs().max() < 0.02 * moved
    assert torch.allclose(b, b_ref, atol=1e-6)


def test_stacked_expert_weights_are_updated_as_separate_matrices():
    torch.manual_seed(0)
    stacked = nn.Parameter(torch.randn(4, 16, 32))
    slices = [nn.Parameter(stacked.detach()[e].clone()) for e in range(4)]
    a = MuonAdamW([{"params": [stacked], "muon": True}], lr=0.01)
    b = MuonAdamW([{"params": slices, "muon": True}], lr=0.01)
    for _ in range(3):
        g = torch.randn(4, 16, 32)
        stacked.grad = g.clone()
        for e, p in enumerate(slices):
            p.grad = g[e].clone()
        a.step()
        b.step()
    assert torch.allclose(stacked, torch.stack(slices), atol=1e-6)


def test_muon_takes_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    cfg = load_config(TINY)
    cfg.model.vocab = ["a", "b"]
    model = build_model(cfg.model)
    chosen = muon_parameters(model)
    names = {name for name, p in model.named_parameters() if id(p) in chosen}
    assert any(name.endswith("experts.w_in") for name in names)
    assert any(name.endswith("attn.qkv.weight") for name in names)
    assert not any("router" in name or name.startswith(("final_layer.linear", "patch_embed")) for name in names)
    assert all(p.dim() >= 2 for p in model.parameters() if id(p) in chosen)
    optimizer = MuonAdamW.for_model(model, lr=1e-3, weight_decay=0.01)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
