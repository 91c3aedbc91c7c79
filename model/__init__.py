"""seedlm models: the gated-attention MoE and DeltaProduct families as Hugging Face classes.

`import model` registers both families with AutoConfig, AutoModel and AutoModelForCausalLM, and marks the
classes for `register_for_auto_class`, so `save_pretrained` writes the modeling files next to the weights
and the folder loads with `trust_remote_code=True` on machines without seedlm.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_deltaproduct import DeltaProductConfig
from .configuration_gated_moe import GatedMoeConfig
from .delta_product_kernels import chunk_delta_product, recurrent_delta_product
from .modeling_deltaproduct import DeltaProductCache, DeltaProductForCausalLM, DeltaProductModel
from .modeling_gated_moe import GatedMoeForCausalLM, GatedMoeModel, GatedMoePreTrainedModel
from .moe import load_balancing_loss, router_z_loss

AutoConfig.register(GatedMoeConfig.model_type, GatedMoeConfig, exist_ok=True)
AutoModel.register(GatedMoeConfig, GatedMoeModel, exist_ok=True)
AutoModelForCausalLM.register(GatedMoeConfig, GatedMoeForCausalLM, exist_ok=True)
GatedMoeConfig.register_for_auto_class()
GatedMoeModel.register_for_auto_class("AutoModel")
GatedMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(DeltaProductConfig.model_type, DeltaProductConfig, exist_ok=True)
AutoModel.register(DeltaProductConfig, DeltaProductModel, exist_ok=True)
AutoModelForCausalLM.register(DeltaProductConfig, DeltaProductForCausalLM, exist_ok=True)
DeltaProductConfig.register_for_auto_class()
DeltaProductModel.register_for_auto_class("AutoModel")
DeltaProductForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DeltaProductConfig",
    "DeltaProductModel",
    "DeltaProductForCausalLM",
    "DeltaProductCache",
    "chunk_delta_product",
    "recurrent_delta_product",
    "GatedMoeConfig",
    "GatedMoeModel",
    "GatedMoeForCausalLM",
    "GatedMoePreTrainedModel",
    "load_balancing_loss",
    "router_z_loss",
]
