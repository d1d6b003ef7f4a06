"""TextVQA answer normalization exactly as EvalAI / LLaVA's `m4c_evaluator.EvalAIAnswerProcessor`, quirks included.

Quirks kept on purpose (they change scores): commas and `?` go before the punctuation step, so its digit-comma
clause never fires; the period regex gets `re.UNICODE` (= 32) as its *count*, so at most 32 periods are deleted;
only lowercase contraction keys can match.
"""
from __future__ import annotations

import re

# The VQA-eval contractions table (EvalAI/mmf spelling with straight apostrophes), verbatim, 120 entries, including
# its never-matching capitalized keys and the reversed "somebody'd" entry.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# 21 characters; `. ' : * & # $ % ^ | ~` are deliberately absent, as in the reference.
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# The reference's "(?!<=\d)" is a lookahead for the literal "<=": it never blocks, so this is "a period not
# followed by a digit".
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = int(re.UNICODE)  # the reference passes re.UNICODE (32) as sub()'s count


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATIONS:
        # The test looks at the string before this step, not at `out`.
        if p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """EvalAI's answer processing for one prediction or ground-truth answer."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """The 10-answer VQA soft accuracy: mean over the 10 leave-one-out subsets of min(1, matches / 3)."""
    if len(gt_answers) != 10:
        raise ValueError(f"VQA accuracy needs exactly 10 ground-truth answers, got {len(gt_answers)}")
    pred = normalize_answer(prediction)
    n = sum(normalize_answer(a) == pred for a in gt_answers)
    # Leaving out a matching answer leaves n-1 matches (n such subsets), leaving out another leaves n.
    return (n * min(1.0, (n - 1) / 3) + (10 - n) * min(1.0, n / 3)) / 10
