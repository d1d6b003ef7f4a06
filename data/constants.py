"""Constants shared by MobileVLM's data pipeline and model (values from the original code)."""

IGNORE_INDEX = -100  # label of positions that are not supervised
IMAGE_TOKEN_INDEX = -200  # placeholder id that the model replaces by the image's tokens
DEFAULT_IMAGE_TOKEN = "<image>"
NUM_IMAGE_TOKENS = 144  # LDPv2 pools CLIP's 24x24 patch grid to 12x12
IMAGE_SIZE = 336
PAD_TOKEN_ID = 0  # <unk>, as MobileVLM pads
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
