"""The hardness predictor ("hp"): a small network that predicts how likely the classifier is to err.

Deliberative explanations score an image's difficulty three ways; two are read off the classifier
(``cs``, ``entropy``), the third is learnt (Wang & Vasconcelos, "Towards realistic predictors",
ECCV 2018). Ours is a head on the classifier's own features at the insecurity layer,
``s(F) = sigmoid(w · mean_ij SiLU(conv1×1(F̂))(i, j) + b)`` with F̂ the features standardised per
channel by the statistics of the images it is fitted on (a fixed affine map: Adam then needs half
the epochs), for two reasons:

* the difficulty map D = Σ_k F_k ⊙ ReLU(∂s/∂F_k) needs s as a function of the same features F the
  class maps are read from; a separate image network would have features of its own;
* a head on frozen features trains in seconds on a CPU, and SiLU (smooth, unlike ReLU) leaves the
  second-order term of 2ndG something to measure besides the final sigmoid.

**Targets.** The predictor learns ``1 − p_y(x)``, the classifier's softmax probability of the true
class taken away from 1 (the realistic-predictor target: soft, so even a classifier with few errors
gives a signal on every image), with binary cross-entropy. The targets must be *held-out*
predictions: on its own training images a classifier has fit the labels and would teach the
predictor that nothing is ever hard. ``cross_fit`` therefore trains one predictor per fold of the
evaluated split on the other folds; each image is scored by the predictor that never saw it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HardnessPredictor(nn.Module):
    """s(F) ∈ (0, 1) from features [B, K, h, w] (see the module docstring)."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))
        self.conv = nn.Conv2d(channels, hidden, 1)
        self.fc = nn.Linear(hidden, 1)

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        # The 1×1 convolution of the standardised features as one matmul over channels-last rows, with
        # the standardisation folded into its weights: the same function, but 2ndG runs it on one copy
        # of the features per location, where every full-size elementwise pass counts (1.5x faster).
        weight = self.conv.weight[:, :, 0, 0] / self.std.view(1, -1)
        bias = self.conv.bias - weight @ self.mean.view(-1)
        hidden = F.silu(features.permute(0, 2, 3, 1) @ weight.T + bias)  # [B, h, w, hidden]
        return self.fc(hidden.mean(dim=(1, 2))).squeeze(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(features))


def hardness_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 − p_y: how far the classifier's probability of the true class falls short of certainty."""
    p = torch.softmax(logits.float(), dim=1)
    return 1 - p.gather(1, labels.view(-1, 1).to(logits.device)).squeeze(1)


def fold_assignment(n: int, folds: int, seed: int) -> torch.Tensor:
    """Fold of each of n images, int64 [n]: a seeded permutation dealt round-robin (sizes differ by ≤ 1)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.int64)
    out[order] = torch.arange(n) % folds
    return out


def fit_predictor(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    hidden: int = 32,
    epochs: int = 60,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
) -> HardnessPredictor:
    """A predictor trained with Adam and binary cross-entropy against soft ``targets`` in [0, 1].

    Deterministic in ``seed`` (initialisation and batch order), on the features' device."""
    torch.manual_seed(seed)
    model = HardnessPredictor(features.shape[1], hidden).to(features.device)
    model.mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
    model.std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed + 1)
    targets = targets.to(features.device, torch.float32)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for batch in order.split(batch_size):
            loss = F.binary_cross_entropy_with_logits(model.logit(features[batch]), targets[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def predict_hardness(model: HardnessPredictor, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """s for every row of ``features``, float32 [N]."""
    model.eval()
    return torch.cat([model(part).float() for part in features.split(batch_size)]) if len(features) else torch.empty(0)
