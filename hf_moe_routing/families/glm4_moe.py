"""GLM-4.5 / GLM-4.6 (``glm4_moe``): the DeepSeek-V3 router (sigmoid, selection bias, top-2 groups)."""

from . import register_family
from .deepseek import DeepseekV3Family


@register_family
class Glm4MoeFamily(DeepseekV3Family):
    name = "glm4_moe"
    model_types = ("glm4_moe",)
    router_classes = ("Glm4MoeTopkRouter",)
