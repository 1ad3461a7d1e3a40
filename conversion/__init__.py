"""Retrofit Llama models into MTA models that compute exactly what the Llama computed."""

from .llama_conversion import LlamaConversion, convert_llama
from .errors import ConversionError
from .retrofit import RETROFIT_DEFAULTS, mta_config_from_llama, retrofit_llama

__all__ = ["RETROFIT_DEFAULTS", "ConversionError", "LlamaConversion", "convert_llama", "mta_config_from_llama", "retrofit_llama"]
