"""Templates and label masks: literal ids on the real LLaMA vocabulary, equivalence with the original LLaVA/MobileVLM
algorithm (reimplemented naively here), eval prompts, malformed records."""
from __future__ import annotations

import copy

import pytest
import sentencepiece as spm

from data import BadRecord, build_prompt, load_tokenizer, make_demo_tokenizer, preprocess

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")
X = -100
# Expected ids, from raw sentencepiece on each chunk of the original prompt (split at <image> and </s>):
# sp(SYS + " USER: ")
SYS_USER = [319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076, 8444,
            29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889,
            3148, 1001, 29901, 29871]
USER_ = [3148, 1001, 29901, 29871]  # fixtures README: "USER: "
NL_WHAT_IS_IT = [29871, 13, 5618, 338, 372, 29973]  # fixtures README: "\nWhat is it?"
ASSISTANT_COLON = [319, 1799, 9047, 13566, 29901]  # "▁A" "SS" "IST" "ANT" ":"
# sp("\nWhat is in the picture? ASSISTANT: A cat.") = instruction part + answer part
Q1 = [29871, 13, 5618, 338, 297, 278, 7623, 29973] + ASSISTANT_COLON
A1 = [319, 6635, 29889]  # "A cat."
# sp("USER: What color is it? ASSISTANT: It is black.")
Q2 = [3148, 1001, 29901, 1724, 2927, 338, 372, 29973] + ASSISTANT_COLON
A2 = [739, 338, 4628, 29889]  # "It is black."
CAPTION_NL = [319, 11203, 6057, 373, 278, 17455, 29889, 13]  # sp("A dog runs on the grass.\n")


def test_expected_ids_agree_with_the_fixture_readme():
    assert SYS_USER[-4:] == USER_
    assert Q1[:4] == NL_WHAT_IS_IT[:4]  # "▁" "\n" "What" "▁is"


@pytest.fixture(scope="module")
def llama(llama_tokenizer_dir):
    return load_tokenizer(llama_tokenizer_dir)


def test_plain_supervises_the_caption_and_final_newline(llama):
    rec = {"id": "p", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": "A dog runs on the grass."}]}
    out = preprocess(rec, llama, "plain")
    assert out["input_ids"] == [1, -200] + CAPTION_NL
    assert out["labels"] == [X, X] + CAPTION_NL


def test_v1_two_turns_supervises_answers_and_eos(llama):
    rec = {"id": "v", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is in the picture?\n<image>"},  # the tag moves to the front
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What color is it?"},
        {"from": "gpt", "value": "It is black."}]}
    out = preprocess(rec, llama, "v1")
    assert out["input_ids"] == [1] + SYS_USER + [-200] + Q1 + A1 + [2] + Q2 + A2 + [2]
    assert out["labels"] == [X] * (1 + len(SYS_USER) + 1 + len(Q1)) + A1 + [2] + [X] * len(Q2) + A2 + [2]
    assert [t for t in out["labels"] if t != X] == [319, 6635, 29889, 2, 739, 338, 4628, 29889, 2]


def test_eval_prompt_ids(llama):
    ids = build_prompt("What is it?", llama)
    assert ids == [1] + SYS_USER + [-200] + NL_WHAT_IS_IT + ASSISTANT_COLON
    i = ids.index(-200)
    assert ids[i - 2:i + 3] == [29901, 29871, -200, 29871, 13]
    assert ids[-1] == 29901  # generation starts right after "ASSISTANT:", no trailing space
    text_only = build_prompt("What is it?", llama, image=False)
    assert text_only == [1] + SYS_USER[:-1] + [1724, 338, 372, 29973] + ASSISTANT_COLON
    with pytest.raises(ValueError, match="without '<image>'"):
        build_prompt("<image>\nWhat is it?", llama)
    with pytest.raises(ValueError, match="v1"):
        build_prompt("What is it?", llama, template="plain")


# ---- the original algorithm, naively: render the prompt, tokenize it whole, recover answer spans by counting ----

def _slow_tokenize(sp, text):
    """transformers 4.33 slow LlamaTokenizer (legacy): BOS, "</s>" split out, every chunk a fresh sp call."""
    ids = [1]
    for i, chunk in enumerate(text.split("</s>")):
        ids += ([2] if i else []) + sp.encode(chunk)
    return ids


def _tokenizer_image_token(sp, prompt):
    chunks = [_slow_tokenize(sp, c) for c in prompt.split("<image>")]
    ids = chunks[0]
    for c in chunks[1:]:
        ids += [-200] + c[1:]
    return ids


def _original(sp, record, template):
    convs = copy.deepcopy(record["conversations"])
    has_image = "image" in record
    if has_image:  # preprocess_multimodal
        for t in convs:
            if "<image>" in t["value"]:
                t["value"] = ("<image>\n" + t["value"].replace("<image>", "").strip()).strip()
    if template == "plain":
        ids = _tokenizer_image_token(sp, "<image>" + convs[1]["value"] + "\n")
        return ids, [X, X] + ids[2:]
    if convs[0]["from"] != "human":
        convs = convs[1:]
    prompt = SYS + " "
    for j, t in enumerate(convs):
        prompt += ("USER" if t["from"] == "human" else "ASSISTANT") + ": " + t["value"] + (" " if j % 2 == 0
                                                                                           else "</s>")
    tok = (lambda s: _tokenizer_image_token(sp, s)) if has_image else (lambda s: _slow_tokenize(sp, s))
    ids = tok(prompt)
    labels = list(ids)
    total_len = sum(t != 0 for t in ids)
    cur = 1
    labels[0] = X
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len, instr_len = len(tok(rou)), len(tok(parts[0])) - 2
        labels[cur:cur + instr_len] = [X] * instr_len
        cur += round_len
    labels[cur:] = [X] * (len(labels) - cur)
    assert cur == total_len, "the original would report a tokenization mismatch"
    return ids, labels


def _conv(*values, first="human"):
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


V1_RECORDS = [
    {"image": "a.jpg", "conversations": _conv("<image>\nWhat is it?", "A cat.")},
    {"image": "a.jpg", "conversations": _conv("Describe this.\n<image>", "A dog runs on the grass.",
                                              "Is it big?", "No.", "What color?", "Brown and white.")},
    {"image": "a.jpg", "conversations": _conv("Hello there.", "Hi!", "Look: <image> what now?", "A tree.")},
    {"conversations": _conv("What is 2+2?", "4", "And  3 + 3 ?  ", "6, of course.")},
    {"image": "a.jpg", "conversations": _conv("<image>", " It's a photo\nof héllo 日本.  ")},
    {"image": "a.jpg", "conversations": _conv("stray", "<image>\nQ?", "\nA leading newline.", first="gpt")},
    {"image": "a.jpg", "conversations": _conv("No tag here.", "Then text only.")},
]
PLAIN_RECORDS = [
    {"image": "a.jpg", "conversations": _conv("<image>\nDescribe.", "A red circle.")},
    {"image": "a.jpg", "conversations": _conv("Caption:<image>", "  Two  spaces.\nTwo lines. ")},
]


@pytest.fixture(scope="module", params=["llama", "demo"])
def tokenizer_pair(request, tmp_path_factory):
    if request.param == "llama":
        folder = request.getfixturevalue("llama_tokenizer_dir")
    else:
        folder = make_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))
    return load_tokenizer(folder), spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


@pytest.mark.parametrize("template,record", [("v1", r) for r in V1_RECORDS] + [("plain", r) for r in PLAIN_RECORDS])
def test_same_ids_and_labels_as_the_original_algorithm(tokenizer_pair, template, record):
    tok, sp = tokenizer_pair
    ids, labels = _original(sp, record, template)
    out = preprocess(record, tok, template)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    assert any(t != X for t in labels)


def test_record_with_image_but_no_tag_is_text_only(llama):
    out = preprocess(V1_RECORDS[-1], llama, "v1")
    assert -200 not in out["input_ids"]


def _bad(*convs, image="a.jpg"):
    rec = {"id": "b", "conversations": list(convs)}
    if image is not None:
        rec["image"] = image
    return rec


H, G = (lambda v: {"from": "human", "value": v}), (lambda v: {"from": "gpt", "value": v})
BAD = [
    ("v1", _bad(H("<image>\nQ"), H("Q"), G("A")), "bad_record", "alternating"),
    ("v1", _bad(H("<image>\nQ"), G("A"), H("Q2")), "bad_record", "ending with gpt"),
    ("v1", _bad(), "bad_record", "non-empty list"),
    ("v1", {"id": "b"}, "bad_record", "non-empty list"),
    ("v1", ["not", "a", "dict"], "bad_record", "JSON object"),
    ("v1", _bad(H("<image>\nQ <image>"), G("A")), "two_images", "2 '<image>' tags"),
    ("v1", _bad(H("<image>\nQ"), G("A"), H("<image>"), G("B")), "two_images", "2 '<image>' tags"),
    ("plain", _bad(H("<image>"), G("A"), H("Q"), G("B")), "bad_record", "exactly one human and one gpt"),
    ("plain", _bad(H("Describe."), G("A")), "bad_record", "needs '<image>'"),
    ("v1", _bad(H("<image>\nQ"), {"from": "gpt", "value": 3}), "bad_record", "turn 1"),
    ("v1", _bad(H("<image>\nQ"), {"from": "system", "value": "x"}), "bad_record", "turn 1"),
    ("v1", _bad(H("<image>\nQ"), G("A"), image=None), "bad_record", "no 'image'"),
    ("v1", _bad(H("<image>\nQ"), G("A"), image=["a.jpg", "b.jpg"]), "bad_record", "relative path string"),
    ("v1", _bad(H("<image>\nQ"), G("  ")), "bad_record", "empty gpt answer"),
    ("v1", _bad(H("<image>\nQ"), G("A</s>B")), "bad_record", "'</s>'"),
    ("v1", _bad(H("Q"), G("<image>A")), "bad_record", "gpt turn"),
    ("v1", _bad(H(""), G("A"), image=None), "bad_record", "empty human turn"),
]


@pytest.mark.parametrize("template,record,reason,match", BAD)
def test_malformed_records_raise_bad_record(llama, template, record, reason, match):
    with pytest.raises(BadRecord, match=match) as e:
        preprocess(record, llama, template)
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


def test_unknown_template(llama):
    with pytest.raises(ValueError, match="unknown template"):
        preprocess(V1_RECORDS[0], llama, "v2")
