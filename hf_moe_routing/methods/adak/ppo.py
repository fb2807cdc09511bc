"""Ada-K's reinforcement-learning math, as pure tensor functions.

Each MoE layer l = 1..L with an allocator is an agent. For token i it sees the state s_il (the hidden
state the router sees, optionally with the router's sorted log-probabilities), picks
k_il ~ pi_l(. | s_il) over {1..k_max}, and receives the reward

    R_i      = log p(x_{i+1} | x_{<=i})             under the sampled expert counts
    R_i^topk = the same under the model's own Top-K routing (no-grad baseline forward)
    A_il     = gamma^(L-l) (R_i - R_i^topk)                      (the paper's advantage, Eq. 9-10)

Two lower-variance baselines (:func:`leave_one_out_advantages`, and the per-layer counterfactual
``A_il = R_i - R_i^(l: Top-K)`` assembled by the trainer from L extra forwards) share the same
objective below.

The allocators are updated with the PPO clipped surrogate, per (layer, token)::

    r_il = pi_new(k_il | s_il) / pi_old(k_il | s_il)
    L_clip = - mean_{l,i} min(r_il A_il, clip(r_il, 1 - eps, 1 + eps) A_il)
    L_k    = lambda * (1/L) sum_l mean_i sum_n n P_l(n | s_il)    (expected k, differentiable)
    L_ent  = - beta * (1/L) sum_l mean_i H(P_l(. | s_il))
    loss   = L_clip + L_k + L_ent
"""

from __future__ import annotations

import torch

#: How advantages are rescaled before the PPO objective.
ADVANTAGE_NORMALIZATIONS = ("none", "scale", "standardize")


def choose_k(
    logits: torch.Tensor,
    decision: str,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert counts (n,) long in 1..k_max from allocator logits (n, k_max).

    ``"greedy"``: ``k = argmax_n P(n) + 1``; ``"sample"``: ``k ~ P = softmax(logits)``, by inverse
    CDF from ``uniforms`` (n,) in [0, 1) if given (``k = 1 + #{n : sum_{j<=n} P(j) <= u}``, so the
    draw of a token depends only on its own uniform), else ``torch.multinomial`` with ``generator``.
    """
    if decision == "greedy":
        return logits.argmax(dim=-1) + 1
    if decision == "sample":
        probs = torch.softmax(logits.float(), dim=-1)
        if uniforms is None:
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1) + 1
        if uniforms.shape != probs.shape[:1]:
            raise ValueError(
                f"uniforms {tuple(uniforms.shape)} must have one value per row of {tuple(probs.shape)}."
            )
        below = (probs.cumsum(dim=-1)[:, :-1] <= uniforms.to(probs).unsqueeze(-1)).sum(dim=-1)
        return below + 1
    raise ValueError(f"decision must be 'greedy' or 'sample', got {decision!r}.")


def action_log_probs(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``log P(k | s)`` (n,) for allocator logits (n, k_max) and actions k (n,) in 1..k_max."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, (k - 1).long().unsqueeze(-1)).squeeze(-1)


def expected_k(logits: torch.Tensor) -> torch.Tensor:
    """``E[k] = sum_n n P(n | s)`` (n,) for allocator logits (n, k_max); differentiable."""
    probs = torch.softmax(logits.float(), dim=-1)
    counts = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=probs.dtype)
    return probs @ counts


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(P) = - sum_n P(n) log P(n)`` (n,) for allocator logits (n, k_max)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def token_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward ``R_bt = log p(labels[b, t+1] | x_{<=t})`` and its validity mask.

    ``logits`` (B, T, V), ``labels`` (B, T) unshifted (as passed to a causal LM). Returns
    ``(rewards, mask)``, both (B, T): position t is rewarded for predicting token t+1, the last
    position and positions whose next label is -100 or whose own token is padding give no reward
    (reward 0, mask False).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match.")
    nxt = labels[:, 1:]
    valid = nxt != -100
    if attention_mask is not None:
        valid = valid & attention_mask[:, :-1].bool()
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    rewards = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=logits.device)
    rewards[:, :-1] = picked.masked_fill(~valid, 0.0)
    mask[:, :-1] = valid
    return rewards, mask


def layer_advantages(
    rewards: torch.Tensor, baseline: torch.Tensor, num_layers: int, gamma: float
) -> torch.Tensor:
    """``A_il = gamma^(L-l) (R_i - R_i^topk)`` for l = 1..L: shape (L, *rewards.shape)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
    delta = (rewards - baseline).float()
    exponents = torch.arange(num_layers - 1, -1, -1, device=delta.device, dtype=torch.float32)
    discounts = gamma**exponents
    return discounts.view(-1, *([1] * delta.dim())) * delta.unsqueeze(0)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A_g = R_g - mean_{g' != g} R_g'`` for G >= 2 samples stacked on dim 0: shape of ``rewards``.

    The group baseline of RLOO (Ahmadian et al. 2024): each sample of k is judged against the
    other samples of the same tokens under the current policy.
    """
    groups = rewards.shape[0]
    if groups < 2:
        raise ValueError(f"The leave-one-out baseline needs >= 2 samples per batch, got {groups}.")
    rewards = rewards.float()
    return rewards - (rewards.sum(dim=0, keepdim=True) - rewards) / (groups - 1)


def normalize_advantages(advantages: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Rescale advantages over the valid entries (``mask`` broadcastable to ``advantages``).

    ``"none"``: unchanged (advantages stay in nats, so lambda keeps the paper's meaning);
    ``"scale"``: ``A / std(A)``; ``"standardize"``: ``(A - mean(A)) / std(A)``.
    """
    if method not in ADVANTAGE_NORMALIZATIONS:
        raise ValueError(
            f"advantage normalization must be one of {ADVANTAGE_NORMALIZATIONS}, got {method!r}."
        )
    if method == "none":
        return advantages
    mask = mask.expand_as(advantages)
    values = advantages[mask]
    if values.numel() < 2:
        return advantages
    std = values.std().clamp(min=1e-8)
    if method == "scale":
        return advantages / std
    return (advantages - values.mean()) / std


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 if the mask is empty)."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def clipped_surrogate(
    new_log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_epsilon: float
) -> torch.Tensor:
    """Per-entry PPO objective ``min(r A, clip(r, 1 - eps, 1 + eps) A)``, ``r = pi_new / pi_old`` (Eq. 11).

    To be maximised (the loss is its negative mean). Raises ValueError for ``clip_epsilon <= 0``.
    """
    if clip_epsilon <= 0:
        raise ValueError(f"clip epsilon must be > 0, got {clip_epsilon}.")
    ratio = torch.exp(new_log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    return torch.minimum(unclipped, clipped)


def ppo_clipped_objective(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss and clip fraction over the valid (layer, token) entries.

    ``loss = - mean min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(log pi_new - log pi_old)``;
    ``clip_fraction = mean [|r - 1| > eps]``.
    """
    loss = -masked_mean(clipped_surrogate(new_log_probs, old_log_probs, advantages, clip_epsilon), mask)
    ratio = torch.exp(new_log_probs - old_log_probs)
    clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_epsilon).float(), mask.expand_as(ratio))
    return loss, clip_fraction.detach()


def expected_k_penalty(
    logits_per_layer: list[torch.Tensor], masks: list[torch.Tensor], lam: float
) -> torch.Tensor:
    """``lambda * (1/L) sum_l mean_i sum_n n P_l(n | s_il)`` over the valid tokens of each layer."""
    terms = [masked_mean(expected_k(logits), mask) for logits, mask in zip(logits_per_layer, masks)]
    return lam * torch.stack(terms).mean()


def policy_gradient_snr(
    features: torch.Tensor,
    logits: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> float:
    """Signal-to-noise ratio of one layer's policy gradient ``g = mean_i A_i grad log pi(k_i | s_i)``.

    For a linear allocator ``grad_W log pi(k | s) = (e_k - P) s^T`` exactly, so with per-token terms
    ``x_i = A_i (e_k - P_i) s_i^T`` (``features`` (n, f), ``logits`` (n, k_max), ``actions`` (n,),
    ``advantages`` (n,), ``mask`` (n,) bool) the batch gradient's noise is ``v = tr Cov(x) / n`` and
    ``E ||g||^2 = ||E g||^2 + v``. Returns ``sqrt(max(||g||^2 - v, 0) / v)``: the estimated norm of the
    expected gradient in units of its noise (0: pure noise; above 1: the batch gradient points somewhere).
    0 if fewer than 2 tokens.
    """
    keep = mask.reshape(-1).bool()
    n = int(keep.sum())
    if n < 2:
        return 0.0
    f, adv = features[keep].double(), advantages.reshape(-1)[keep].double()
    probs = torch.softmax(logits[keep].double(), dim=-1)
    direction = -probs
    direction[torch.arange(n), actions.reshape(-1)[keep].long() - 1] += 1.0
    weighted = direction * adv.unsqueeze(-1)  # (n, k_max)
    mean = weighted.T @ f / n  # (k_max, f)
    second = ((weighted**2).sum(-1) * (f**2).sum(-1)).mean()
    noise = ((second - (mean**2).sum()) * n / (n - 1)).clamp(min=0.0) / n  # unbiased tr Cov / n
    if noise <= 0:
        return 0.0
    return float(((mean**2).sum() - noise).clamp(min=0.0).div(noise).sqrt())
