"""Forward FLOPs per token of a MoE model under its routing, and the reduction vs. top-k (``evaluate`` metric).

Load it offline by path: ``evaluate.load(hf_moe_routing.metrics.metric_path("flops_per_token"))``.
"""

import datasets
import evaluate

from hf_moe_routing.metrics.core import activated_per_layer, flops_summary

_DESCRIPTION = """
Analytic forward FLOPs per token (2 x multiply-accumulates: attention, dense MLPs, shared experts,
routed experts, routers, LM head) of a Mixture-of-Experts model at a given sequence length, given the
mean activated routed experts of every MoE layer, and the reduction against the model's own top-k
routing. Inputs are the same as for the ``activated_experts`` metric; ``model_config`` (a transformers
model or config, a config dict, or a local folder / Hub id of a config) and ``seq_len`` are arguments
of ``compute``.
"""

_KWARGS_DESCRIPTION = """
Args:
    activated: list of batches; each batch a list with the mean activated experts of every MoE layer.
    num_tokens: list with the number of tokens of each batch.
    model_config: the model (or its config) the counts come from.
    seq_len: tokens per sequence (sets the attention cost).
Returns:
    flops_per_token: forward FLOPs per token with the measured activated experts.
    topk_flops_per_token: the same with the model's top-k.
    flops_reduction: 1 - flops_per_token / topk_flops_per_token.
    routed_expert_flops_per_token: the routed experts' share of flops_per_token.
    mean_activated_experts: mean over layers of the token-weighted activated experts.
Examples:
    >>> flops = evaluate.load(hf_moe_routing.metrics.metric_path("flops_per_token"))
    >>> flops.compute(activated=[[1.5, 1.5]], num_tokens=[64], model_config=model.config, seq_len=512)
"""

_CITATION = """
@article{kaplan2020scaling,
  title={Scaling Laws for Neural Language Models},
  author={Kaplan, Jared and others},
  journal={arXiv preprint arXiv:2001.08361},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FlopsPerToken(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"activated": datasets.List(datasets.Value("float64")), "num_tokens": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2001.08361"],
        )

    def _compute(self, activated, num_tokens, model_config=None, seq_len=None):
        if model_config is None or seq_len is None:
            raise ValueError("flops_per_token needs compute(..., model_config=model.config, seq_len=N).")
        return flops_summary(model_config, int(seq_len), activated_per_layer(activated, num_tokens))
