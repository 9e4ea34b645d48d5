"""Tokenizers for the models' text encoders.

Real models load their tokenizer with the encoder (`load_tokenizer(path_or_id)`). The tiny test variants use
random tiny encoders whose vocabulary is built here: the common words of facial-expression text (FACS action
descriptions, face regions, intensity and timing, emotion names) as whole tokens, and letters, digits and
punctuation with their "##" continuations for everything else, so any English text tokenises offline. Whole
words keep captions short (a character-level caption is ~5x longer) and let a tiny model learn from them quickly.
"""
from __future__ import annotations

import string

from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from affectprep.vocabulary import require_vocabulary

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = string.ascii_lowercase + string.digits
_PUNCTUATION = ".,;:!?'\"()-=/%+*&"
_WORDS = """
a an the of and or to in on at by from with without its their his her this that is are was be no not
face facial expression emotion emotions movement movements region person subject clip video frame frames
brow brows eyebrow eyebrows forehead eye eyes lid lids eyelid eyelids cheek cheeks nose nostril nostrils lip lips
corner corners mouth jaw chin teeth tongue head gaze upper lower inner outer left right both sides side
raise raises raised raiser pull pulls pulled puller pulling lower lowers lowered lowerer press presses pressed
presser tighten tightens tightened tightener stretch stretches stretched stretcher wrinkle wrinkles wrinkled
wrinkler drop drops dropped open opens opened close closes closed part parts parted apart together draw draws
drawn push pushes depress depressor funneler dimple dimpler suck blink blinks squint narrow narrows widen
up down outward inward sideways back forward briefly slightly clearly strongly strong weak mild moderate
intense intensity onset apex offset peak peaking peaks held hold holds easing eases end start first last
begins returns still stays remains relaxed tense growing
happy happiness sad sadness angry anger fear fearful surprise surprised disgust disgusted contempt neutral
calm worry worried anxiety helplessness disappointment tired tiredness excited excitement frustration
au
"""


def _vocabulary() -> list[str]:
    words = list(dict.fromkeys(_WORDS.split()))
    return _SPECIAL + list(_CHARS) + list(_PUNCTUATION) + [f"##{c}" for c in _CHARS] + \
        [w for w in words if w not in _CHARS]


# Tiny encoders must have at least this many embeddings.
TINY_VOCAB_SIZE = len(_vocabulary())


def tiny_tokenizer() -> BertTokenizer:
    """A lower-casing BERT tokenizer: known words are one token, any other word its letters (`h ##e ##l ##l ##o`)."""
    return BertTokenizer(vocab={token: i for i, token in enumerate(_vocabulary())}, do_lower_case=True)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a text encoder (a local folder, or a hub id already in the cache); refused when it
    knows no word (a folder without tokenizer files)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    require_vocabulary(tokenizer, str(name_or_path))
    return tokenizer
