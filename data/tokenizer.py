"""The LLaMA tokenizer with the semantics MobileVLM trained with.

MobileVLM used transformers 4.33's slow `LlamaTokenizer` (legacy): the special-token strings in a text become their
ids, and every other chunk is a separate sentencepiece call, so each chunk starts with sentencepiece's dummy-prefix
"▁" (the chunk after a `</s>` starts with "▁USER"). transformers 5 only builds fast tokenizers, whose non-legacy
pre-tokenizer prefixes the first chunk only; the label masks depend on the legacy behaviour, so encoding is done
here with `sentencepiece` directly (or the `tokenizers` library for a folder that only has `tokenizer.json`),
one chunk at a time.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .constants import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID

SPECIAL_TOKENS = {"<unk>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_SPECIAL_IDS = frozenset(SPECIAL_TOKENS.values())
# transformers' `clean_up_tokenization` (applied by decode when the checkpoint's tokenizer_config asks for it)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Encode/decode with legacy slow-LlamaTokenizer semantics; ids <unk>=pad=0, <s>=1, </s>=2."""

    bos_token_id = BOS_TOKEN_ID
    eos_token_id = EOS_TOKEN_ID
    pad_token_id = PAD_TOKEN_ID  # MobileVLM pads with <unk>
    unk_token_id = PAD_TOKEN_ID
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<unk>", "<unk>"

    def __init__(self, path: Path, clean_up_tokenization_spaces: bool = False):
        self.path = Path(path)  # the model file, hashed by `tokenizer_fingerprint`
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def _encode_chunk(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_chunk(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _check_special_ids(self, lookup) -> None:
        found = {tok: lookup(tok) for tok in SPECIAL_TOKENS}
        if found != SPECIAL_TOKENS:
            raise ValueError(f"{self.path}: special token ids {found}, expected {SPECIAL_TOKENS} "
                             "(the LLaMA vocabulary that MobileVLM uses)")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids of `text`: "<s>", "</s>", "<unk>" become their ids, every other chunk is encoded on its own."""
        ids = [BOS_TOKEN_ID] if bos else []
        for i, chunk in enumerate(_SPECIAL_SPLIT.split(text)):
            if i % 2:
                ids.append(SPECIAL_TOKENS[chunk])
            elif chunk:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D tensor). With `skip_special_tokens` (what eval uses) this is the slow
        LlamaTokenizer's decode; otherwise special tokens are written in place, between the decoded runs."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        names = {v: k for k, v in SPECIAL_TOKENS.items()}
        out, run = "", []
        for t in ids:
            if t not in _SPECIAL_IDS:
                run.append(t)
            elif not skip_special_tokens:
                out += self._decode_chunk(run) + names[t]
                run = []
        out += self._decode_chunk(run)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUP:
                out = out.replace(a, b)
        return out

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]


class SentencePieceTokenizer(Tokenizer):
    """From `tokenizer.model` (what MobileVLM checkpoints ship)."""

    def __init__(self, path: Path, clean_up_tokenization_spaces: bool = False):
        super().__init__(path, clean_up_tokenization_spaces)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self._check_special_ids(self.sp.piece_to_id)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_chunk(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_chunk(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class JsonTokenizer(Tokenizer):
    """From the `tokenizer.json` of a sentencepiece-converted LLaMA tokenizer (a HF fast tokenizer). HF's BPE can
    split runs of whitespace ("▁▁x") differently from sentencepiece, so prefer `tokenizer.model` when there is one."""

    def __init__(self, path: Path, clean_up_tokenization_spaces: bool = False):
        from tokenizers import Tokenizer as HFTokenizer

        super().__init__(path, clean_up_tokenization_spaces)
        self.tok = HFTokenizer.from_file(str(path))
        self._check_special_ids(self.tok.token_to_id)
        # Such files map spaces to "▁" either in a legacy normalizer or in a Metaspace pre-tokenizer, and the
        # latter skips the dummy prefix of a chunk that starts with a space; doing the mapping here gives
        # sentencepiece's result with both.
        self.tok.normalizer = None
        self.tok.pre_tokenizer = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def _encode_chunk(self, text: str) -> list[int]:
        return self.tok.encode("▁" + text.replace(" ", "▁"), add_special_tokens=False).ids

    def _decode_chunk(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a model folder: `tokenizer.model` (preferred) or `tokenizer.json`."""
    folder = Path(folder)
    hint = ("put the checkpoint's tokenizer files there: tokenizer.model (the LLaMA SentencePiece file that "
            "mtgv/MobileVLM_V2-1.7B and -7B ship) or a tokenizer.json")
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}; {hint}")
    # the slow LlamaTokenizer defaults to no clean-up; a checkpoint's tokenizer_config.json may say otherwise
    config = folder / "tokenizer_config.json"
    clean_up = bool(json.loads(config.read_text()).get("clean_up_tokenization_spaces", False)) \
        if config.is_file() else False
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model", clean_up)
    if (folder / "tokenizer.json").is_file():
        return JsonTokenizer(folder / "tokenizer.json", clean_up)
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}; {hint}")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's model file: teacher and student must have the same one for logit KD."""
    return hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()
