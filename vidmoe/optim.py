"""Muon for the transformer's hidden matrices, AdamW for everything else, in one optimizer.

Muon (momentum, then the update's matrix replaced by the nearest semi-orthogonal one) takes every
Linear weight inside the network and the stacked expert weights [E, rows, cols], which it treats as E
separate matrices. Embeddings, the output head, convolutions, routers, norms and biases keep AdamW.
One optimizer object keeps one state dict and one learning-rate schedule for Accelerate.
The Muon step is scaled to AdamW's update size (0.2 * sqrt(max(rows, cols))), so the AdamW learning
rate and weight decay apply to both kinds of parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adam import adam

from .moe import GroupedExperts

# Quintic Newton-Schulz coefficients that push every singular value of the normalised update towards 1
# in five steps (Jordan et al., "Muon", 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """update [..., rows, cols] -> about U V^T of its SVD, per matrix, in bf16 (the iteration tolerates it)."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x if wide else x.mT).to(update.dtype)


def weight_decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms, biases and gains."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters Muon should take: Linear weights between the input and the output layer, and
    stacked expert weights; not routers (their logits pick experts), not the first or last layer."""
    chosen: set[int] = set()
    last = getattr(getattr(model, "final_layer", None), "linear", None)
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            chosen.update(id(p) for p in (module.w_in, module.w_out))
        elif isinstance(module, nn.Linear) and module is not last:  # a Router is not an nn.Linear
            chosen.add(id(module.weight))
    return chosen


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with ``muon=True`` get Muon (Nesterov momentum ``momentum``), the others AdamW."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, momentum: float = 0.95, eps: float = 1e-8, ns_steps: int = 5,
                 fused: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, momentum=momentum, eps=eps,
                        ns_steps=ns_steps, muon=False, fused=fused)
        super().__init__(groups, defaults)

    @classmethod
    def for_model(cls, model: nn.Module, lr: float, weight_decay: float, **kwargs) -> "MuonAdamW":
        """Muon for the hidden matrices; AdamW with decay on the other matrices, without on norms and biases."""
        muon_ids = muon_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in muon_ids], "muon": True, "weight_decay": weight_decay},
                  *weight_decay_groups([p for p in params if id(p) not in muon_ids], weight_decay)]
        return cls([g for g in groups if g["params"]], lr=lr, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        # Matrices of one shape are orthogonalised together: one batched iteration instead of many small ones.
        by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            by_shape.setdefault((tuple(p.shape[-2:]), p.dtype, p.device), []).append(
                (p, p.grad.lerp(buf, momentum)))  # Nesterov
        for (shape, _, _), items in by_shape.items():
            matrices = [u.reshape(-1, *shape) for _, u in items]
            updates = orthogonalize(torch.cat(matrices), group["ns_steps"]).split([m.shape[0] for m in matrices])
            scale = 0.2 * math.sqrt(max(shape))
            for (p, _), update in zip(items, updates):
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=group["fused"] or None,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
