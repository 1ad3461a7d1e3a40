"""Turn other checkpoints into MTA models: retrofit Llamas, import the official MTA code's checkpoints."""

from .errors import ConversionError
from .lingua_conversion import LinguaConversion, convert_lingua
from .llama_conversion import LlamaConversion, convert_llama
from .retrofit import RETROFIT_DEFAULTS, mta_config_from_llama, retrofit_llama

__all__ = [
    "RETROFIT_DEFAULTS",
    "ConversionError",
    "LinguaConversion",
    "LlamaConversion",
    "convert_lingua",
    "convert_llama",
    "mta_config_from_llama",
    "retrofit_llama",
]
