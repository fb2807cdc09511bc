"""Families whose routing is not a learned top-k router that hf-moe-routing can replace, and why.

``describe_model`` refuses them before anything changes, with the reason given here. (Families not
listed are probed; a router that no kind reproduces is refused with the step that failed.)
"""

from .base import MoEFamily


class DeepseekV4Family(MoEFamily):
    name = "deepseek_v4"
    model_types = ("deepseek_v4",)
    refusal = (
        "its first MoE layers route by a fixed table keyed on token ids (DeepseekV4HashRouter reads "
        "input_ids), which is not a learned top-k router"
    )


class DogeFamily(MoEFamily):
    name = "doge"
    model_types = ("doge",)
    refusal = (
        "it routes by product keys inside the block (DogeCDMoE: two top-k over key halves, then a top-k "
        "over their sums; experts are embedding rows), with no router module to replace"
    )


class JetMoeFamily(MoEFamily):
    name = "jetmoe"
    model_types = ("jetmoe",)
    refusal = (
        "its routers (JetMoeTopKGating, also in the attention: mixture of attention heads) return a sorted "
        "dispatch plan for its own parallel experts, not per-token experts and weights"
    )


class ZayaFamily(MoEFamily):
    name = "zaya"
    model_types = ("zaya",)
    refusal = (
        "its router is an MLP that carries a state from one layer's router to the next (ZayaRouter's "
        "router_states) and has a skip class, not a learned top-k over the layer's hidden states"
    )


class DbrxFamily(MoEFamily):
    name = "dbrx"
    model_types = ("dbrx",)
    refusal = (
        "its router returns logits only and the block chooses the experts itself "
        "(DbrxFFN.route_tokens_to_experts), so there is no router output to replace"
    )


class InklingFamily(MoEFamily):
    name = "inkling_text"
    model_types = ("inkling_text",)
    refusal = (
        "its router also weighs the shared experts (a fourth output normalised together with the routed "
        "weights: softmax of log-sigmoids over the chosen and shared experts), a rule hf-moe-routing "
        "does not reproduce yet"
    )
