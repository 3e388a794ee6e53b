"""Losses for transfer: supervised, joint, domain-adversarial, class-confusion and distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over ``(N, C)`` logits and ``(N,)`` int targets, with optional label smoothing."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def joint_loss(loss_source: torch.Tensor, loss_target: torch.Tensor, lam: float) -> torch.Tensor:
    """Optimisation-based transfer ``L = L_S + lam * L_T`` (both scalars)."""
    return loss_source + lam * loss_target


def domain_adversarial_loss(domain_logits_s: torch.Tensor, domain_logits_t: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a domain discriminator: source labelled 1, target 0.

    Inputs are ``(N_s, 1)`` and ``(N_t, 1)`` logits computed on gradient-reversed features
    (DANN, Ganin et al. 2016), so minimising this trains the discriminator and, through the
    reversal, pushes the feature extractor towards domain-invariant features.
    """
    ls = F.binary_cross_entropy_with_logits(domain_logits_s, torch.ones_like(domain_logits_s))
    lt = F.binary_cross_entropy_with_logits(domain_logits_t, torch.zeros_like(domain_logits_t))
    return 0.5 * (ls + lt)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of ``(N, C)`` probabilities -> ``(N,)``."""
    return -(probs * torch.log(probs + 1e-6)).sum(dim=1)


def global_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every data-parallel rank, concatenated in rank order, with gradients flowing back to each rank's
    own rows; ``x`` itself outside ``torch.distributed`` or with one rank.

    For a loss of batch statistics (MCC's class-confusion matrix) the batch is the objective: computed on each
    rank's slice, it would change with the number of workers. Ranks may hold different numbers of rows (the last
    batch of an epoch): each is padded to the largest for the collective, then trimmed. Every rank computes the
    same global loss; the collective's backward sums the ranks' gradients and DDP then averages them, so the
    parameters get exactly the gradient of the one-process loss on the whole batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = torch.zeros(dist.get_world_size(), dtype=n.dtype, device=x.device)
    dist.all_gather_into_tensor(sizes, n)
    sizes = sizes.tolist()  # one read back to the host per step, whatever the number of ranks
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    return torch.cat([part[:k] for part, k in zip(all_gather(padded), sizes)])


def mcc_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al., ECCV 2020) on unlabeled target logits ``(N, C)``.

    Temperature-scaled predictions are weighted by certainty (1 + exp(-entropy)); the
    class-correlation matrix is row-normalised and its off-diagonal mass (confusion) is returned.
    Computed in fp32 even under autocast, whose bf16/fp16 matrix product would round the ``(C, C)``
    correlations.
    """
    n, c = logits.shape
    with torch.autocast(logits.device.type, enabled=False):
        p = F.softmax(logits.float() / temperature, dim=1)
        w = 1 + torch.exp(-entropy(p).detach())
        w = (n * w / w.sum()).unsqueeze(1)
        conf = (p * w).t() @ p
        conf = conf / conf.sum(dim=1, keepdim=True)
        return (conf.sum() - torch.trace(conf)) / c


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015).

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; with no
    ``target`` only the soft term is used. Logits are ``(N, C)``.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)
    if target is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, target)
