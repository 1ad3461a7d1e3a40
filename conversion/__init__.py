"""Retrofit Llama models into MTA models that compute exactly what the Llama computed."""

from .retrofit import RETROFIT_DEFAULTS, mta_config_from_llama, retrofit_llama

__all__ = ["RETROFIT_DEFAULTS", "mta_config_from_llama", "retrofit_llama"]
