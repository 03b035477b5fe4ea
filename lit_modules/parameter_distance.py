"""Fig. 10's measure: how far the training network is from its label-correction model.

The paper (A.4, Fig. 10) explains why co-teaching beats momentum correction by the Euclidean
distance between the parameters of the training model and the model that corrects its labels: an
EMA copy stays close to the network it averages, so it predicts what the network itself predicts
and errors accumulate; two co-taught networks stay apart. Both numbers are per-network totals over
the trainable parameters, compared by name, so a frozen backbone (equal in both) adds nothing.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["parameter_distance"]


@torch.no_grad()
def parameter_distance(network: nn.Module, other: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean and relative distance between the trainable parameters of two networks.

    Args:
        network: The training network; its parameters with ``requires_grad`` are compared.
        other: The label-correction model (co-teaching partner, momentum copy), with parameters of
            the same names and shapes (e.g. ``AveragedModel.module``).

    Returns:
        ``||theta - theta_other||_2`` over the flattened trainable parameters, and that distance
        divided by ``||theta||_2`` (0 for identical copies), both float64 scalars.
    """
    others = dict(other.named_parameters())
    squared, norms = [], []
    for name, param in network.named_parameters():
        if not param.requires_grad:
            continue
        if name not in others or others[name].shape != param.shape:
            raise ValueError(f"parameter {name!r} has no counterpart of shape {tuple(param.shape)}")
        theta = param.detach().double()
        squared.append((theta - others[name].detach().to(theta)).square().sum())
        norms.append(theta.square().sum())
    if not squared:
        raise ValueError("the training network has no trainable parameter to compare")
    distance = torch.stack(squared).sum().sqrt().cpu()
    norm = torch.stack(norms).sum().sqrt().cpu()
    return distance, distance / norm.clamp_min(torch.finfo(torch.float64).tiny)
