"""Answer normalisation of the reference VQA scorer (LLaVA-Med's `eval_metrics/glossary.py`).

The behaviour is reproduced quirk for quirk so that scores equal the reference's on the same files:
punctuation handling is decided on the *original* string for every mark, the period regex carries
the reference's typo (`(?!<=\\d)` is a look-ahead, so every period not followed by a digit goes) and
is applied with `count=re.UNICODE` (= 32) because the flag was passed positionally, articles are
dropped after number words are mapped to digits, and contractions are restored after that.
"""

from __future__ import annotations

import re

# Standard VQA contraction table (keys without apostrophe -> canonical form). Keys with capitals
# never match (the text is lower-cased first) but are kept so the table reads like the reference's.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Marks that are deleted (when they touch a space, or when the text holds a digit,digit group) or
# else replaced by a space. The period is handled separately, the apostrophe is kept.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's pattern, typo included
_PERIOD_MAX_REPLACEMENTS = int(re.UNICODE)  # the reference passes re.UNICODE as `count` (= 32)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")


def normalize_word(text: str) -> str:
    """Normalise an answer exactly like the reference's `normalize_word` (see the module docstring)."""
    original = text
    strip_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in PUNCTUATION:
        touches_space = (mark + " " in original) or (" " + mark in original)
        text = text.replace(mark, "" if (touches_space or strip_all) else " ")
    text = _PERIOD.sub("", text, count=_PERIOD_MAX_REPLACEMENTS)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    words = [CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")
