"""Per-layer budgets of Ada-K training: ``AdaKTrainingConfig.layer_targets`` checked against the model."""

from __future__ import annotations

from collections.abc import Callable

from .config import AdaKTrainingConfig


def layer_targets(
    config: AdaKTrainingConfig, layers: list[int], most: int, moe_mean: Callable[[list[float]], float]
) -> dict[int, float] | None:
    """``{layer index: mean k}`` from ``config.layer_targets``, or None when it is not set.

    Args:
        config: the training config; ``layer_targets`` holds one mean k per Ada-K layer, in layer order.
        layers: the Ada-K layers' indices, sorted.
        most: the largest k an allocator may give (``k_max``).
        moe_mean: mean routed experts over all MoE layers from per-Ada-K-layer means (layers without
            an allocator count at the model's top-k).

    Raises:
        ValueError: a count other than one value per Ada-K layer, values whose MoE-layer mean is not
            ``target_experts`` (within 0.1%), or a value above ``most``.
    """
    if config.layer_targets is None:
        return None
    if len(config.layer_targets) != len(layers):
        raise ValueError(
            f"layer_targets has {len(config.layer_targets)} values, but the model has {len(layers)} "
            f"Ada-K layers ({layers}): give one mean k per Ada-K layer, in layer order."
        )
    targets = dict(zip(layers, map(float, config.layer_targets)))
    mean = moe_mean(list(targets.values()))
    if abs(mean - config.target_experts) > 1e-3 * config.target_experts or max(targets.values()) > most:
        raise ValueError(
            f"layer_targets={config.layer_targets} average {mean:.4f} experts over the MoE layers, but "
            f"target_experts={config.target_experts}; each must also be at most k_max={most}."
        )
    return targets
