"""A fold ensemble as ONE network: the mean of K fold models' calibrated probabilities.

``cxr-ray train --folds K --final ensemble`` keeps the K fold models instead
of retraining one on all data. Each member was calibrated on its own fold's
validation patients (temperature ``T_i``); the ensemble's output is

    log( mean_i softmax(member_i(x) / T_i) )

so that the softmax every engine applies to a network's output gives exactly
the mean calibrated probability (softmax(log p) = p for p summing to 1). It
is a plain ``nn.Module``: it exports to ONE ONNX graph, builds one TensorRT
engine and runs in one backend call, and screen, serve and evaluate treat it
like any other artifact. Its state dict is ``members.<i>.<member key>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cxr_ray.models.build import build_model


class FoldEnsemble(nn.Module):
    temperatures: torch.Tensor

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]) -> None:
        super().__init__()
        if not members or len(members) != len(temperatures):
            raise ValueError(f"an ensemble needs one temperature per member, got {len(members)} and {len(temperatures)}")
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
        self.members = nn.ModuleList(members)
        # a buffer, not a parameter: saved with the weights, exported as a constant
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = [torch.log_softmax(member(x).float() / self.temperatures[i], dim=1)
                     for i, member in enumerate(self.members)]
        # log of the mean probability, computed stably in log space. Written out (max + log-sum-exp of
        # the rest) rather than torch.logsumexp: OpenVINO 2026.4's ONNX frontend reads the exported
        # ReduceLogSumExp(axes=[0]) as a reduction over every axis, and the graph then fails to convert.
        stacked = torch.stack(log_probs, dim=0)
        peak = stacked.amax(dim=0)
        return peak + torch.log(torch.exp(stacked - peak).sum(dim=0)) - math.log(len(log_probs))


def build_network(arch: str, num_classes: int, temperatures: Sequence[float] | None = None) -> nn.Module:
    """A randomly initialised network: one registered architecture, or (with ``temperatures``) an ensemble of them."""
    if temperatures is None:
        return build_model(arch, num_classes)
    return FoldEnsemble([build_model(arch, num_classes) for _ in temperatures], temperatures)
