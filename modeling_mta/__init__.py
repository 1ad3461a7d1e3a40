"""Multi-Token Attention models for Transformers.

Importing this package registers the model with AutoConfig, AutoModel and AutoModelForCausalLM,
and marks the classes so that `save_pretrained` writes `auto_map` and the code files a folder
needs to load with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mta import MTAConfig
from .modeling_mta import MTACache, MTAForCausalLM, MTAModel, MTAPreTrainedModel

AutoConfig.register(MTAConfig.model_type, MTAConfig, exist_ok=True)
AutoModel.register(MTAConfig, MTAModel, exist_ok=True)
AutoModelForCausalLM.register(MTAConfig, MTAForCausalLM, exist_ok=True)
MTAConfig.register_for_auto_class()
MTAModel.register_for_auto_class("AutoModel")
MTAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MTACache", "MTAConfig", "MTAForCausalLM", "MTAModel", "MTAPreTrainedModel"]
