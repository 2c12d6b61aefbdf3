"""Switch Transformers (Fedus et al.): T5 v1.0 encoder-decoder blocks with top-1 ReLU experts.

`config` (SwitchConfig), `layers` (the blocks, in Hugging Face's parameter names), `model` (the
whole model in memory, for training the tiny model and for tests) and `family` (the
`Architecture` the rest of the package uses).
"""

from .family import SwitchArchitecture

__all__ = ["SwitchArchitecture"]
