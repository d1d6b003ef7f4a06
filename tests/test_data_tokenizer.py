"""Tokenizer: legacy sentencepiece semantics on the real LLaMA vocabulary, decoding, errors, fingerprints."""
from __future__ import annotations

import shutil

import pytest
import torch

from data import load_tokenizer, make_demo_tokenizer, tokenizer_fingerprint
from data.tokenizer import JsonTokenizer, SentencePieceTokenizer

LLAMA_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"  # fixtures/README.md


@pytest.fixture(scope="module")
def llama(llama_tokenizer_dir):
    return load_tokenizer(llama_tokenizer_dir)


def test_readme_examples_and_special_ids(llama):
    assert isinstance(llama, SentencePieceTokenizer)
    assert llama.encode("USER: ") == [3148, 1001, 29901, 29871]
    assert llama.encode("\nWhat is it?") == [29871, 13, 5618, 338, 372, 29973]
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 0)
    assert llama.vocab_size == len(llama) == 32000
    assert llama.encode("A cat.", bos=True) == [1, 319, 6635, 29889]


def test_special_tokens_split_and_each_chunk_gets_the_dummy_prefix(llama):
    # "</s>" is one id, and the chunk after it starts with "▁US" (3148), not "US" as a non-legacy tokenizer gives
    assert llama.encode("A cat.</s>USER: ") == [319, 6635, 29889, 2, 3148, 1001, 29901, 29871]
    assert llama.encode("<s>") == [1] and llama.encode("<unk>") == [0]
    assert llama.encode("") == [] and llama.encode("</s>", bos=True) == [1, 2]


def test_decode(llama):
    ids = [1, 319, 6635, 29889, 2]
    assert llama.decode(ids, skip_special_tokens=True) == "A cat."
    assert llama.decode(ids) == "<s>A cat.</s>"
    padded = torch.tensor([ids + [0, 0], [739, 338, 4628, 29889, 2, 0, 0]])
    assert llama.batch_decode(padded, skip_special_tokens=True) == ["A cat.", "It is black."]
    assert llama.decode([739, 338, 4628, 869]) == "It is black ."  # no clean-up without a tokenizer_config


def test_clean_up_follows_tokenizer_config(llama_tokenizer_dir, tmp_path):
    shutil.copy(llama_tokenizer_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"clean_up_tokenization_spaces": true}')
    assert load_tokenizer(tmp_path).decode([739, 338, 4628, 869]) == "It is black."


def test_fingerprint(llama, llama_tokenizer_dir, tmp_path):
    assert tokenizer_fingerprint(llama) == LLAMA_SHA256
    shutil.copy(llama_tokenizer_dir / "tokenizer.model", tmp_path)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == LLAMA_SHA256
    assert tokenizer_fingerprint(load_tokenizer(make_demo_tokenizer(tmp_path / "demo"))) != LLAMA_SHA256


def test_missing_folder_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"tokenizer folder not found: {tmp_path / 'nope'}.*tokenizer.model"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in .*MobileVLM"):
        load_tokenizer(tmp_path)


def test_wrong_special_ids_rejected(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 10), model_writer=model,
                                   vocab_size=12, bos_id=2, eos_id=1, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="special token ids"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_folder_matches_sentencepiece(llama, llama_tokenizer_dir, tmp_path):
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir)).save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer_config.json").unlink()
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, JsonTokenizer) and tok.vocab_size == 32000
    texts = ["USER: ", "\nWhat is it?", "A cat.</s>USER: What color is it? ASSISTANT:", "héllo wörld 日本 42.\n"]
    for text in texts:
        assert tok.encode(text) == llama.encode(text), text
        ids = llama.encode(text, bos=True)
        assert tok.decode(ids, skip_special_tokens=True) == llama.decode(ids, skip_special_tokens=True)
    assert tok.decode(llama.encode(texts[3]), skip_special_tokens=True) == texts[3]
