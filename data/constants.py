"""The data pipeline's constants: MobileVLM's conventions, defined with the model (model/constants.py)."""
from model.constants import (BOS_TOKEN_ID, CLIP_MEAN, CLIP_STD, DEFAULT_IMAGE_TOKEN, EOS_TOKEN_ID, IGNORE_INDEX,
                             IMAGE_SIZE, IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS, PAD_TOKEN_ID)

__all__ = ["BOS_TOKEN_ID", "CLIP_MEAN", "CLIP_STD", "DEFAULT_IMAGE_TOKEN", "EOS_TOKEN_ID", "IGNORE_INDEX",
           "IMAGE_SIZE", "IMAGE_TOKEN_INDEX", "NUM_IMAGE_TOKENS", "PAD_TOKEN_ID"]
