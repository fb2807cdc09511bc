"""A GRPO step with routing replay on a tiny MoE, following TRL's GRPO code (trl 1.16).

TRL's ``GRPOTrainer`` needs a tokenizer, a dataset and its generation stack, which a tiny offline
model does not have; this test runs the same computation as its ``_generate_single_turn``
(completion mask up to the first EOS), ``_get_per_token_logps_and_entropies`` (log-probabilities
of the completion tokens, ``trl.trainer.utils.selective_log_softmax``) and ``_compute_loss``
(``coef_1 = exp(per_token_logps - old_per_token_logps)``, clipped surrogate), with
``old_per_token_logps`` the rollout engine's log-probabilities of the sampled tokens, as with
``vllm_importance_sampling_correction`` (``trl/trainer/grpo_trainer.py``).

The engine routes slightly differently from the trainer (as a different kernel or batch
composition does on near-tied experts; modelled by small per-expert selection offsets): without
replay the first step's importance ratios are off where the routing flipped; with the rollout's
experts replayed they are 1 up to float32 rounding.
"""

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from hf_moe_routing import describe_model, patch_model, record_routing, replay_routing, unpatch_model  # noqa: E402
from hf_moe_routing.evaluation import RoutingStats  # noqa: E402
from hf_moe_routing.patching import routing_layers  # noqa: E402
from hf_moe_routing.testing import OffsetConfig, tiny_model  # noqa: E402

EOS, PAD = 5, 0


def _rollout(model, prompts, prompt_mask, new_tokens=8, seed=0):
    """Sample completions as an engine would, recording its experts; returns what TRL keeps."""
    patch_model(model, OffsetConfig(top_k=describe_model(model).shape.top_k))
    gen = torch.Generator().manual_seed(seed)
    for layer in routing_layers(model).values():  # the engine's near-tie flips
        layer.offset.copy_(0.02 * torch.randn(layer.offset.shape, generator=gen))
    torch.manual_seed(seed)
    with torch.no_grad(), record_routing(model) as routed:
        out = model.generate(
            prompts,
            attention_mask=prompt_mask,
            max_new_tokens=new_tokens,
            do_sample=True,
            eos_token_id=EOS,
            pad_token_id=PAD,
            output_logits=True,
            return_dict_in_generate=True,
        )
    unpatch_model(model)
    completion_ids = out.sequences[:, prompts.shape[1] :]
    # trl GRPOTrainer._generate_single_turn: mask everything after the first EOS
    is_eos = completion_ids == EOS
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    completion_mask = (torch.arange(is_eos.size(1)).expand(is_eos.size(0), -1) <= eos_idx.unsqueeze(1)).int()
    # the engine's log-probabilities of the sampled tokens (vLLM's logprobs)
    logits = torch.stack(out.logits, dim=1)
    sampling_logps = selective_log_softmax(logits, completion_ids)
    return routed, completion_ids, completion_mask, sampling_logps


def _per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """trl GRPOTrainer._compute_loss / _get_per_token_logps_and_entropies: log p of each completion token."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits_to_keep = completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -logits_to_keep - 1 : -1]  # position t predicts token t + 1
    return selective_log_softmax(logits, completion_ids)


def _grpo_step(model, batch, sampling_logps, advantages, epsilon=0.2):
    """trl GRPOTrainer._compute_loss (loss_type "dapo", beta 0, token-level importance sampling)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    per_token_logps = _per_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    coef_1 = torch.exp(per_token_logps - sampling_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    mask = completion_mask.bool()
    loss = (per_token_loss * mask).sum() / mask.sum()
    return loss, coef_1.detach()[mask]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_grpo_importance_ratios_are_one_with_replay_at_the_first_step(family):
    model = tiny_model(family)
    prompts = torch.randint(6, 128, (4, 6), generator=torch.Generator().manual_seed(1))
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :2] = 0  # left padding, as TRL's tokenizer pads prompts
    prompt_mask[3, :1] = 0
    routed, completion_ids, completion_mask, sampling_logps = _rollout(model, prompts, prompt_mask)
    batch = (prompts, prompt_mask, completion_ids, completion_mask)
    advantages = torch.tensor([1.0, -0.5, 0.5, -1.0])

    model.train()
    with RoutingStats(model) as stats, replay_routing(model, routed):
        loss, ratios = _grpo_step(model, batch, sampling_logps, advantages)
    loss.backward()
    without_loss, without = _grpo_step(model, batch, sampling_logps, advantages)

    # with replay: the trainer recomputes what the engine computed, up to float32 rounding
    # (KV-cache decode steps vs one forward)
    assert (ratios - 1).abs().max() < 1e-5
    # without: the tokens whose experts flipped are weighed by ratios off by orders of magnitude more
    # (a tiny random model's logits are small: a real model's are off by far more)
    assert (without - 1).abs().max() > 1e-3
    # the disagreement replay removed, as RoutingStats reports it
    changes = stats.replay_changes
    # every recorded real token; a completion without EOS has one the engine never forwarded
    replayed = prompt_mask.sum() + completion_mask.sum(dim=1).clamp(max=completion_ids.shape[1] - 1).sum()
    assert routed.lengths == (prompt_mask.sum(dim=1) + completion_ids.shape[1] - 1).tolist()
    assert changes["num_tokens"] == int(replayed)
    assert 0 < changes["decision_share"] < 1
    # gradients reach every router through the recomputed weights
    for block in describe_model(model).blocks:
        grad = block.spec.weight(block.router).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
