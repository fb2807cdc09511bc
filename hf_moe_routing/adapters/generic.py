"""Any other transformers MoE family with the standard gate/experts interface and softmax-top-k routing.

The adapter cannot know the family's weighting rules, so it probes them: it runs the original
router on a few random hidden states and keeps the rule (renormalised or not, cast or not) that
reproduces it exactly. A router that no rule reproduces is refused.
"""

from __future__ import annotations

import torch

from .base import MoEAdapter, MoEBlock


class GenericAdapter(MoEAdapter):
    family = "generic"

    def __init__(self, model_type: str = "generic") -> None:
        self.family = model_type
        self.normalize = None
        self.cast_weights = True

    def check_router(self, block: MoEBlock) -> None:
        gate = block.gate
        missing = [a for a in ("top_k", "num_experts") if not hasattr(gate, a)]
        if missing or gate.weight.dim() != 2:
            raise TypeError(
                f"{block.name}.gate ({type(gate).__name__}) lacks {missing or ['a 2-D weight']}: it is not a "
                "standard transformers top-k router. Supported families: " + ", ".join(_supported()) + "."
            )
        state = [n for n, _ in gate.named_parameters() if n != "weight"] + [
            n for n, _ in gate.named_buffers()
        ]
        if state:
            raise TypeError(
                f"{block.name}.gate ({type(gate).__name__}) holds state besides its weight ({', '.join(state)}), "
                "so it is not a plain softmax-top-k router the generic adapter can reproduce. Supported families: "
                + ", ".join(_supported())
                + "."
            )
        if gate.weight.device.type == "meta":  # offloaded or config-only: nothing to probe with
            return
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(16, self.hidden_dim(gate), generator=generator).to(gate.weight)
        with torch.no_grad():
            try:
                reference = type(gate).forward(gate, hidden)
            except Exception as error:  # noqa: BLE001 - any failure means "not the standard interface"
                raise TypeError(f"{block.name}.gate does not take hidden states alone: {error}") from error
            for normalize in (True, False):
                for cast in (True, False):
                    self.normalize, self.cast_weights = normalize, cast
                    ours = self.route(gate, hidden)
                    if _same_routing(ours, reference):
                        return
        raise TypeError(
            f"{block.name}.gate ({type(gate).__name__}) is not a softmax-top-k router that the generic adapter "
            "can reproduce. Supported families: "
            + ", ".join(_supported())
            + ". Open an issue with the model's modeling file to add an adapter."
        )


def _same_routing(ours: tuple, reference: object) -> bool:
    if not isinstance(reference, tuple) or len(reference) != 3:
        return False
    _, ref_weights, ref_index = reference
    _, weights, index = ours
    return (
        ref_index.shape == index.shape
        and torch.equal(ref_index, index)
        and ref_weights.dtype == weights.dtype
        and torch.equal(ref_weights, weights)
    )


def _supported() -> list[str]:
    from . import ADAPTERS

    return sorted(ADAPTERS)
