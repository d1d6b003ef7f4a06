"""Data for MobileVLM V2 / Align-KD: tokenizer, templates and label masks, images, datasets, subsets, synthetic data."""
from .dataset import SKIP_REASONS, Collator, LLaVADataset
from .images import expand2square, process_image
from .json_index import DataFileError, JsonListIndex
from .subsets import SUBSETS, Subset, resolve_subset
from .synthetic import make_demo_tokenizer, make_synthetic_dataset
from .templates import BadRecord, build_prompt, preprocess
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = ["SKIP_REASONS", "SUBSETS", "BadRecord", "Collator", "DataFileError", "JsonListIndex", "LLaVADataset",
           "Subset", "Tokenizer", "build_prompt", "expand2square", "load_tokenizer", "make_demo_tokenizer",
           "make_synthetic_dataset", "preprocess", "process_image", "resolve_subset", "tokenizer_fingerprint"]
