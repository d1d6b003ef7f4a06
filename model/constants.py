"""MobileVLM's token and image conventions (values from the original code), shared by the model and the data."""
from kernels.dispatch import IGNORE_INDEX  # the label the losses skip: PyTorch's ignore_index

IMAGE_TOKEN_INDEX = -200  # placeholder id that the model replaces by the image's tokens
DEFAULT_IMAGE_TOKEN = "<image>"
NUM_IMAGE_TOKENS = 144  # LDPv2 pools CLIP's 24x24 patch grid to 12x12
IMAGE_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_TOKEN_ID = 0  # <unk>, as MobileVLM pads
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

__all__ = ["BOS_TOKEN_ID", "CLIP_MEAN", "CLIP_STD", "DEFAULT_IMAGE_TOKEN", "EOS_TOKEN_ID", "IGNORE_INDEX",
           "IMAGE_SIZE", "IMAGE_TOKEN_INDEX", "NUM_IMAGE_TOKENS", "PAD_TOKEN_ID"]
