"""Stateful routers under activation (gradient) checkpointing.

The recomputed forward in backward must route exactly as the original forward and must not update
the router state (BIP's q, Loss-Free's bias) a second time.
"""

import pytest
import torch

from hf_moe_routing import BIPConfig, LossFreeConfig, patch_model, routing_layers
from hf_moe_routing.testing import tiny_model

CASES = [
    ("mixtral", BIPConfig(update="after")),
    ("mixtral", BIPConfig(update="before")),
    ("qwen2_moe", LossFreeConfig(update_rate=0.05)),
    ("deepseek_v3", LossFreeConfig(update_rate=0.05)),  # updates the model's own e_score_correction_bias
    ("deepseek_v3", BIPConfig(update="after")),
]


def _step(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {
        i: {k: v.clone() for k, v in layer.routing_state().items()}
        for i, layer in routing_layers(model).items()
    }
    return out.loss.detach(), grads, state


@pytest.mark.parametrize(
    ("family", "config"), CASES, ids=lambda v: v if isinstance(v, str) else type(v).__name__
)
def test_checkpointed_training_matches_plain_training(family, config):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(family)
        model.config.use_cache = False
        patch_model(model, config)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        steps = [_step(model, ids) for _ in range(2)]  # the second step routes with updated state
        results.append(steps)
    for (loss, grads, state), (loss_c, grads_c, state_c) in zip(*results, strict=True):
        assert torch.equal(loss, loss_c)
        assert grads.keys() == grads_c.keys()
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-6)
        for i in state:  # updated once per step, not again in the recomputation
            for key in state[i]:
                assert torch.equal(state_c[i][key], state[i][key]), (i, key)
