"""GRACE's training objective (paper Eqs. 6-9): weighted focal + supervised contrastive with mixup + auxiliary text CE.

Targets are class indices (B,) or class distributions (B, C) (mixed-up or smoothed labels) everywhere. Values the
paper leaves open are defaults here (choices): focal gamma 2 and alpha 1 (the class weights already balance),
contrastive temperature 0.07 and mixup Beta(0.2, 0.2), lambdas (1, 1, 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_sqrt_class_weights(counts: Sequence[float] | Tensor) -> Tensor:
    """Class weights w_c proportional to 1 / sqrt(n_c), scaled to average 1 over the classes that occur.

    A class with no samples never appears as a target; it gets weight 0 rather than infinity.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence of per-class sample counts, got shape "
                         f"{tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"class counts must be finite and non-negative, got {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise ValueError("every class count is zero: there is nothing to weight")
    weights = torch.where(present, counts.clamp_min(1e-12).rsqrt(), 0.0)
    return (weights / weights[present].mean()).float()


def labelled_cross_entropy(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """Class-weighted cross-entropy over the samples that carry a label (label >= 0; -1 = unlabelled, as in an
    AU-only batch or a target domain with few labels). With no labelled sample it is a zero that stays on the
    graph, so distributed backward sees the same parameters on every process."""
    labels = torch.as_tensor(labels, device=logits.device)
    labelled = labels >= 0
    if not labelled.any():
        return logits.sum() * 0.0
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32,
                                                                 device=logits.device)
    return F.cross_entropy(logits[labelled].float(), labels[labelled], weight=weights)


def focal_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None, *, gamma: float = 2.0,
               alpha: float = 1.0) -> Tensor:
    """Weighted focal loss (Eq. 6): -sum_c w_c alpha (1 - p_c)^gamma y_c log p_c, averaged with the target weights.

    Normalised by sum_i sum_c w_c y_ic, as weighted cross-entropy is, so gamma=0, alpha=1 is exactly
    `F.cross_entropy(logits, targets, weight=weights)`.
    """
    probabilities = _target_distribution(targets, *logits.shape)
    weights = _class_weights(weights, logits)
    log_p = F.log_softmax(logits.float(), dim=-1)
    modulation = (1 - log_p.exp()).pow(gamma)
    per_class = -alpha * modulation * probabilities * log_p * weights
    return per_class.sum() / (probabilities * weights).sum().clamp_min(1e-12)


def auxiliary_text_loss(text_logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the text branch's own classifier (Eq. 8), keeping refined text emotion-discriminative."""
    probabilities = _target_distribution(targets, *text_logits.shape)
    return -(probabilities * F.log_softmax(text_logits.float(), dim=-1)).sum(-1).mean()


def supervised_contrastive_loss(similarity: Tensor, targets: Tensor, *, temperature: float = 0.07,
                                mixup_alpha: float = 0.0, num_classes: int | None = None) -> Tensor:
    """Cross-modal supervised contrastive loss (Eq. 7) over a similarity matrix s(v, u) (N videos x N texts).

    GRACE's s is the plan-weighted token similarity (III-D c; `Grace.pair_similarity`); for pooled embeddings it
    is f_v . f_t. Anchor i is video i: the denominator runs over every text j != i (the [j != i] of Eq. 7), the
    positives are the other samples of the same class, weighted by label overlap y_i . y_j so mixed samples count
    as partly positive; averaged over the anchors that have a positive, 0 when none has.

    Mixup (mixup_alpha > 0): the batch of N pairs is extended to 2N by mixing each pair with a random partner,
    lambda ~ Beta(alpha, alpha) (torch's global RNG, which the trainer seeds). A similarity is linear in each
    side's features, so mixing the features of both sides is s' = M s M^T with M = [I; lambda I + (1 - lambda)
    P] (P the partner permutation), and the labels are mixed by M too.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (N videos x N texts) matrix, got {tuple(similarity.shape)}")
    size = similarity.shape[0]
    if num_classes is None and targets.dim() == 1:
        num_classes = int(targets.max().item()) + 1 if targets.numel() else 1
    labels = _target_distribution(targets, size, num_classes or targets.shape[-1])
    similarity = similarity.float()
    if mixup_alpha > 0 and size > 1:
        mix = torch.distributions.Beta(mixup_alpha, mixup_alpha).sample().item()
        partner = torch.randperm(size, device=similarity.device)
        identity = torch.eye(size, device=similarity.device)
        mixing = torch.cat([identity, mix * identity + (1 - mix) * identity[partner]])       # M, (2N, N)
        similarity = mixing @ similarity @ mixing.T
        labels = mixing @ labels

    logits = similarity / temperature
    others = ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~others, -torch.inf), dim=1, keepdim=True)
    positive = (labels @ labels.T) * others
    mass = positive.sum(dim=1)
    has_positive = mass > 0
    if not has_positive.any():
        return logits.sum() * 0.0   # keeps the graph connected for distributed backward
    per_anchor = -(positive * log_prob.masked_fill(~others, 0.0)).sum(dim=1) / mass.clamp_min(1e-12)
    return per_anchor[has_positive].mean()


def grace_loss(outputs: dict[str, Tensor], similarity: Tensor | None, labels: Tensor, weights: Tensor | None = None,
               lambdas: tuple[float, float, float] = (1.0, 1.0, 1.0), *, gamma: float = 2.0,
               temperature: float = 0.07, mixup_alpha: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (Eq. 9) = l1 * focal(logits) + l2 * supcon(similarity) + l3 * aux CE(text_logits).

    `outputs` is a GRACE forward's dict, `similarity` its batch's pair similarities (`Grace.pair_similarity`);
    `weights` the class weights (see inverse_sqrt_class_weights). The vision-only baseline (no text: similarity
    None, no text_logits) has only the focal term; the others are zeros. Returns the total and the detached parts
    {"focal", "supcon", "aux"} for logging.
    """
    focal_weight, supcon_weight, aux_weight = lambdas
    logits = outputs["logits"]
    zero = logits.sum() * 0.0
    parts = {
        "focal": focal_loss(logits, labels, weights, gamma=gamma),
        "supcon": zero if similarity is None else supervised_contrastive_loss(
            similarity, labels, temperature=temperature, mixup_alpha=mixup_alpha, num_classes=logits.shape[-1]),
        "aux": auxiliary_text_loss(outputs["text_logits"], labels) if "text_logits" in outputs else zero,
    }
    total = focal_weight * parts["focal"] + supcon_weight * parts["supcon"] + aux_weight * parts["aux"]
    return total, {name: value.detach() for name, value in parts.items()}


def _target_distribution(targets: Tensor, batch: int, classes: int) -> Tensor:
    """Class indices (B,) or distributions (B, C) -> float distributions (B, C), checked against B and C."""
    if targets.dim() == 1:
        if targets.shape[0] != batch:
            raise ValueError(f"{targets.shape[0]} targets for a batch of {batch}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"class-index targets must be integers, got {targets.dtype}")
        if batch and (targets.min() < 0 or targets.max() >= classes):
            raise ValueError(f"targets must lie in [0, {classes}), got values from {targets.min().item()} "
                             f"to {targets.max().item()}")
        return F.one_hot(targets.long(), classes).float()
    if tuple(targets.shape) != (batch, classes):
        raise ValueError(f"soft targets must have shape {(batch, classes)}, got {tuple(targets.shape)}")
    return targets.float()


def _class_weights(weights: Tensor | None, logits: Tensor) -> Tensor:
    if weights is None:
        return logits.new_ones(logits.shape[-1], dtype=torch.float32)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    if tuple(weights.shape) != (logits.shape[-1],):
        raise ValueError(f"class weights must have shape ({logits.shape[-1]},), got {tuple(weights.shape)}")
    return weights
