"""Mean activated routed experts per token (an ``evaluate`` metric).

Load it offline by path: ``evaluate.load(hf_moe_routing.metrics.metric_path("activated_experts"))``.
"""

import datasets
import evaluate

from hf_moe_routing.metrics.core import activated_summary

_DESCRIPTION = """
The mean number of routed experts a Mixture-of-Experts model activates per token (shared experts are
not counted). Top-k routing activates exactly k; adaptive routings (Ada-K, top-p, dynamic skipping)
activate fewer on easy tokens. Each input row is one forward pass (batch): the per-MoE-layer mean
activated experts of its real (non-padding) tokens and the number of those tokens, e.g.
``stats.last.activated`` and ``stats.last.num_tokens`` of ``RoutingStats(model)``.
"""

_KWARGS_DESCRIPTION = """
Args:
    activated: list of batches; each batch a list with the mean activated experts of every MoE layer.
    num_tokens: list with the number of tokens of each batch (the rows are weighted by it).
Returns:
    mean_activated_experts: token-weighted mean over batches, averaged over layers.
    activated_per_layer: token-weighted mean over batches for every layer.
Examples:
    >>> activated = evaluate.load(hf_moe_routing.metrics.metric_path("activated_experts"))
    >>> activated.compute(activated=[[2.0, 1.0], [1.0, 1.0]], num_tokens=[1, 3])["activated_per_layer"]
    [1.25, 1.0]
"""

_CITATION = """
@inproceedings{yue2025adak,
  title={Ada-K Routing: Boosting the Efficiency of MoE-based LLMs},
  author={Yue, Tongtian and Guo, Longteng and Cheng, Jie and Gao, Xuange and Huang, Hua and Liu, Jing},
  booktitle={International Conference on Learning Representations},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ActivatedExperts(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"activated": datasets.List(datasets.Value("float64")), "num_tokens": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2410.10456"],
        )

    def _compute(self, activated, num_tokens):
        return activated_summary(activated, num_tokens)
