"""MobileVLM V2 on transformers: `from model import MobileVLM`."""
from .capture import ATTN_IMPLEMENTATION, QKCapture
from .config import MobileVLMConfig, tiny_config
from .mobilevlm import MobileVLM, MobileVLMOutput, MultimodalInputs

__all__ = ["MobileVLM", "MobileVLMConfig", "MobileVLMOutput", "MultimodalInputs", "QKCapture", "tiny_config",
           "ATTN_IMPLEMENTATION"]
