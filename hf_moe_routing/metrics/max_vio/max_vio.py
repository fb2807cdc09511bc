"""MaxVio: how unevenly a MoE routes tokens to its experts (an ``evaluate`` metric).

Load it offline by path: ``evaluate.load(hf_moe_routing.metrics.metric_path("max_vio"))``.
"""

import datasets
import evaluate

from hf_moe_routing.metrics.core import max_vio_summary

_DESCRIPTION = """
MaxVio (Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing") measures expert load imbalance:
MaxVio = (max_j load_j - mean_j load_j) / mean_j load_j, where load_j is the number of tokens routed
to expert j in one MoE layer. 0 means perfectly balanced. Each input row is one forward pass (batch):
the (layers x experts) token counts of its MoE layers, e.g. ``RoutingStats(model).last.loads``.
"""

_KWARGS_DESCRIPTION = """
Args:
    loads: list of batches; each batch a list of per-layer lists of tokens per expert (layers x experts).
Returns:
    avg_max_vio: mean over batches of the batch MaxVio averaged over layers.
    sup_max_vio: max over batches of the batch MaxVio averaged over layers.
    max_vio_global: MaxVio of the loads summed over all batches, averaged over layers.
    max_vio_global_per_layer: the same per layer.
Examples:
    >>> max_vio = evaluate.load(hf_moe_routing.metrics.metric_path("max_vio"))
    >>> max_vio.compute(loads=[[[3, 1], [2, 2]]])["avg_max_vio"]
    0.25
"""

_CITATION = """
@article{wang2024auxiliary,
  title={Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts},
  author={Wang, Lean and Gao, Huazuo and Zhao, Chenggang and Sun, Xu and Dai, Damai},
  journal={arXiv preprint arXiv:2408.15664},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaxVio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"loads": datasets.List(datasets.List(datasets.Value("float64")))}),
            reference_urls=["https://arxiv.org/abs/2408.15664"],
        )

    def _compute(self, loads):
        return max_vio_summary(loads)
