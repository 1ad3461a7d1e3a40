"""`from configuration_mta import MTAConfig`.

The class itself lives in `modeling_mta/configuration_mta.py`: a saved model folder receives the
model's code files flat, side by side, and `modeling_mta.py` finds the config there through a
relative import, which works only if both files also sit in one package here.
"""

from modeling_mta import MTAConfig

__all__ = ["MTAConfig"]
