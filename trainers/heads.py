"""Projector and predictor MLPs (MoCo v3 paper Sec. 3 and appendix; official ``MoCo._build_mlp``)."""

from __future__ import annotations

from torch import nn


def mlp(
    num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """Linear(bias=False) -> BN -> ReLU per hidden layer, then Linear(bias=False) [-> BN(affine=False)].

    No Linear biases: every Linear is followed by a BN that would cancel them (except a last layer without
    last BN, which the official code also leaves bias-free). The affine-free last BN follows SimCLR's design.
    ViT: projector mlp(3, d, 4096, 256), predictor mlp(2, 256, 4096, 256), both with last BN.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else hidden_dim
        dim2 = output_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)
