"""seedlm models: the gated-attention MoE and DeltaProduct families as Hugging Face classes.

`import model` registers both families with AutoConfig, AutoModel and AutoModelForCausalLM, and marks the
classes for `register_for_auto_class`, so `save_pretrained` writes the modeling files next to the weights
and the folder loads with `trust_remote_code=True` on machines without seedlm.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gated_moe import GatedMoeConfig
from .modeling_gated_moe import GatedMoeForCausalLM, GatedMoeModel, GatedMoePreTrainedModel
from .moe import load_balancing_loss, router_z_loss

AutoConfig.register(GatedMoeConfig.model_type, GatedMoeConfig, exist_ok=True)
AutoModel.register(GatedMoeConfig, GatedMoeModel, exist_ok=True)
AutoModelForCausalLM.register(GatedMoeConfig, GatedMoeForCausalLM, exist_ok=True)
GatedMoeConfig.register_for_auto_class()
GatedMoeModel.register_for_auto_class("AutoModel")
GatedMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "GatedMoeConfig",
    "GatedMoeModel",
    "GatedMoeForCausalLM",
    "GatedMoePreTrainedModel",
    "load_balancing_loss",
    "router_z_loss",
]
