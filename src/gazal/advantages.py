"""How a GRPO batch's rewards become advantages: Gazal's group rules (neutral skips, gating on
accuracy) and TRL's aggregation and scaling, in one place so that the trainer and the reward
audit compute the same thing.

`trl_advantages` restates TRL's own computation (GRPOTrainer._generate_and_score_completions,
TRL 1.16: sum then normalise, or normalise then sum; group, batch or no scaling; 1e-4 in the
denominator), which TRL keeps inline in a 500-line method that cannot be called on its own. The
reward audit needs it without a trainer; tests/test_grpo.py compares it with the advantages TRL
logs in a real training step, so it fails if TRL changes the formula.
"""

from __future__ import annotations

import torch


def neutral_skips(rewards: torch.Tensor, size: int) -> torch.Tensor:
    """Give a completion that a component skipped (None, NaN here: a judge timeout, say) that
    component's mean over the rest of its group.

    TRL sums the weighted components with NaN as 0, so a skip would score like the component's
    worst and, as timeouts hit long completions, bias the group against length. With the group
    mean it adds nothing to that completion's advantage. Groups the component skipped whole (a
    reward that does not apply to the question) stay NaN, as TRL expects.
    """
    grouped = rewards.view(-1, size, rewards.shape[1])
    skipped = grouped.isnan()
    partial = skipped.any(dim=1, keepdim=True) & ~skipped.all(dim=1, keepdim=True)
    if not partial.any():
        return rewards
    mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped)
    return torch.where(skipped & partial, mean, grouped).view_as(rewards)


def gate_on_accuracy(rewards: torch.Tensor, accuracy: int, gated: tuple[int, ...],
                     size: int) -> tuple[torch.Tensor, float]:
    """Replace the `gated` reward columns by their group mean in groups whose accuracy is constant.

    rewards: (completions, components), groups of `size` consecutive rows, NaN for skipped values.
    A column that is constant within a group adds nothing to that group's advantages under either
    aggregation (sum then normalise, or normalise then sum), and the logged means stay the same.
    Returns the gated rewards and the fraction of groups whose accuracy is all 0 or all 1.
    """
    grouped = rewards.view(-1, size, rewards.shape[1])
    acc = grouped[:, :, accuracy]
    lo = torch.where(acc.isnan(), torch.inf, acc).amin(dim=1)
    hi = torch.where(acc.isnan(), -torch.inf, acc).amax(dim=1)
    constant = (lo >= hi) | acc.isnan().all(dim=1)  # one value (or none) among the scored rows
    if gated and constant.any():
        grouped = grouped.clone()
        for col in gated:
            values = grouped[:, :, col]
            mean = torch.nanmean(values, dim=1, keepdim=True).expand_as(values)
            grouped[:, :, col] = torch.where(constant[:, None] & ~values.isnan(), mean, values)
    return grouped.view_as(rewards), constant.float().mean().item()




def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """TRL's nanstd: the Bessel-corrected standard deviation over the non-NaN values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim)
    count = (~x.isnan()).sum(dim=dim, keepdim=keepdim)
    return (var * count / (count - 1)).sqrt()


def trl_advantages(rewards: torch.Tensor, weights: torch.Tensor, size: int, aggregation: str = "sum_then_normalize",
                   scale: str = "group") -> torch.Tensor:
    """Advantages of (completions, components) rewards in groups of `size`, as TRL computes them."""
    unscorable = rewards.isnan().all(dim=1)
    if aggregation == "sum_then_normalize":
        total = (rewards * weights[None]).nansum(dim=1)
        total[unscorable] = torch.nan
        mean = torch.nanmean(total.view(-1, size), dim=1).repeat_interleave(size)
        if scale == "batch":
            std = _nanstd(total).expand_as(total)
        else:
            std = _nanstd(total.view(-1, size), dim=1).repeat_interleave(size)
        adv = total - mean
        if scale != "none":
            adv = adv / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = rewards.view(-1, size, rewards.shape[1])
        normed = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (_nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        total = (normed.view(-1, rewards.shape[1]) * weights[None]).nansum(dim=1)
        total[unscorable] = torch.nan
        adv = (total - torch.nanmean(total)) / (_nanstd(total) + 1e-4)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return torch.nan_to_num(adv, nan=0.0)


def group_advantages(rewards: torch.Tensor, weights: torch.Tensor, size: int, accuracy: int | None,
                     gated: tuple[int, ...], aggregation: str, scale: str) -> torch.Tensor:
    """What GazalGRPOTrainer turns a batch's rewards into: neutral skips, gating on accuracy, then TRL."""
    rewards = neutral_skips(rewards, size)
    if accuracy is not None:
        rewards, _ = gate_on_accuracy(rewards, accuracy, gated, size)
    return trl_advantages(rewards, weights, size, aggregation, scale)
