"""Canonical label sets and the explicit mapping from each dataset's own codes and names to them.

Label order is a known trap: paper repositories disagree on it (FERV39k loaders use at least three numeric orders).
This module is the one place where an order is defined. A model's output index `i` always means
`label_set(name).names[i]`, and every dataset code or name is mapped here, explicitly, never by position.

Canonical names are lower-case and share one vocabulary across datasets ("happy", "angry", "sad": DFEW's words), so
prompts and FACS tables can be keyed by name whatever the dataset.

Sets:
- basic7   DFEW and FERV39k. Order = DFEW's official codes 1..7.
- mafw11   MAFW single-label. Order = MAFW's own numbering 1..11 (the column order of its annotation.xlsx and the
           ids of single-set.xlsx): anger, disgust, fear, happiness, neutral, sadness, surprise, contempt, anxiety,
           helplessness, disappointment, written with the basic7 words (anger -> angry, happiness -> happy,
           sadness -> sad).
- mafw43   MAFW compound task: the 11 single classes (in mafw11 order) then the 32 multi-label classes that occur in
           MAFW's compound split files, each the "_"-joined mafw11 names in mafw11 order, sorted by their mafw11
           indices. The 32 combinations are the ones listed by the MAFW authors' baseline code (its `Group_multi`
           table of 43 classes); that table's own order is a dict iteration order, so it is not reused.
- basic6   Oulu-CASIA and NVIE (six posed expressions, no neutral, no official numbering): basic7 without neutral,
           in basic7 order, so a six-class head lines up with a seven-class one.
- affectnet8  AffectNet 8-class. Order = AffectNet's own codes 0..7 (neutral, happy, sad, surprise, fear, disgust,
           anger, contempt; written with the basic7 words). Codes 8..10 (none, uncertain, no-face) are outside every
           protocol. AffectNet 7-class is basic7, mapped by name.
- ferplus8 FER+. Order = the vote columns of FER+'s label files (neutral, happiness, surprise, sadness, anger,
           disgust, fear, contempt; written with the basic7 words), then unknown and not-a-face, which are not
           classes.
- RAF-DB basic uses basic7, mapped by name from its codes 1..7 = surprise, fear, disgust, happiness, sadness, anger,
           neutral.
- iemocap4 IEMOCAP 4-class protocol: neutral, happy, angry, sad (= the common `{'neu': 0, 'hap': 1, 'ang': 2,
           'sad': 3}` order of speech-emotion repositories; MGCMA does not state an order). Excited is merged into
           happy; frustrated, surprised, fearful, disgusted, other and no-agreement (xxx) are outside the protocol.
- bp4d12, disfa8  AU occurrence sets (names "AU1"...), in ascending AU number, the order AU papers report.
"""
from __future__ import annotations

from dataclasses import dataclass


class UnknownLabel(ValueError):
    """A dataset code or name that the canonical mapping does not know. The message is fit for a person."""


@dataclass(frozen=True)
class LabelSet:
    name: str
    names: tuple[str, ...]
    au_ids: tuple[int, ...] = ()        # AU numbers for AU sets, in the order of `names`

    @property
    def is_au(self) -> bool:
        return bool(self.au_ids)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownLabel(f"unknown label '{name}' (expected one of {', '.join(self.names)})") from None


BASIC7 = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
BASIC6 = tuple(n for n in BASIC7 if n != "neutral")
AFFECTNET8 = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt")
FERPLUS8 = ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt")
MAFW11 = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise",
          "contempt", "anxiety", "helplessness", "disappointment")
IEMOCAP4 = ("neutral", "happy", "angry", "sad")
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)

# MAFW's own spelling of each class -> canonical name.
MAFW_NAMES = {
    "anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy", "neutral": "neutral",
    "sadness": "sad", "surprise": "surprise", "contempt": "contempt", "anxiety": "anxiety",
    "helplessness": "helplessness", "disappointment": "disappointment",
}

# The 32 multi-label classes of MAFW's compound split, in MAFW spelling.
MAFW_COMPOUNDS = (
    "anger_disgust", "anger_sadness", "anger_surprise", "anger_anxiety", "anger_helplessness",
    "anger_disgust_contempt", "anger_disgust_anxiety",
    "disgust_sadness", "disgust_surprise", "disgust_contempt", "disgust_anxiety", "disgust_helplessness",
    "disgust_disappointment", "disgust_anxiety_helplessness", "disgust_helplessness_disappointment",
    "fear_sadness", "fear_surprise", "fear_anxiety", "fear_sadness_anxiety", "fear_surprise_anxiety",
    "happiness_surprise", "happiness_contempt",
    "sadness_surprise", "sadness_anxiety", "sadness_helplessness", "sadness_disappointment",
    "sadness_anxiety_helplessness", "sadness_helplessness_disappointment",
    "surprise_anxiety", "anxiety_helplessness", "anxiety_helplessness_disappointment", "helplessness_disappointment",
)

DFEW_CODES = {str(code): name for code, name in enumerate(BASIC7, start=1)}     # "1" -> "happy" ... "7" -> "fear"
FERV39K_NAMES = {name: name for name in BASIC7}                                  # matched case-insensitively
RAFDB_CODES = {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}
AFFECTNET_CODES = {str(code): name for code, name in enumerate(AFFECTNET8)}                 # "0" -> "neutral" ...
AFFECTNET_EXCLUDED = {"8": "none", "9": "uncertain", "10": "no-face"}
FERPLUS_VOTES = (*FERPLUS8, "unknown", "not-face")      # the ten vote columns of FER+'s label.csv, in file order
# The expression words of Oulu-CASIA's folders and NVIE's labels (matched case-insensitively) -> canonical name.
EXPRESSION_NOUNS = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy", "sadness": "sad",
                    "surprise": "surprise"}
IEMOCAP_CODES = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
IEMOCAP_EXCLUDED = frozenset({"fru", "sur", "fea", "dis", "oth", "xxx"})


def _mafw_parts(label: str) -> tuple[int, ...]:
    """MAFW label ("anger" or "anger_disgust") -> sorted mafw11 indices; UnknownLabel for a name MAFW does not use."""
    parts = label.strip().lower().split("_")
    unknown = [p for p in parts if p not in MAFW_NAMES]
    if unknown or not label.strip():
        raise UnknownLabel(f"unknown label '{label}' (expected MAFW names: {', '.join(MAFW_NAMES)}, joined by '_')")
    return tuple(sorted({MAFW11.index(MAFW_NAMES[p]) for p in parts}))


def _compound_name(indices: tuple[int, ...]) -> str:
    return "_".join(MAFW11[i] for i in indices)


_MAFW43_INDICES = tuple([(i,) for i in range(len(MAFW11))]
                        + sorted(_mafw_parts(c) for c in MAFW_COMPOUNDS))
MAFW43 = tuple(_compound_name(ix) for ix in _MAFW43_INDICES)

_SETS = {
    "basic7": LabelSet("basic7", BASIC7),
    "basic6": LabelSet("basic6", BASIC6),
    "affectnet8": LabelSet("affectnet8", AFFECTNET8),
    "ferplus8": LabelSet("ferplus8", FERPLUS8),
    "mafw11": LabelSet("mafw11", MAFW11),
    "mafw43": LabelSet("mafw43", MAFW43),
    "iemocap4": LabelSet("iemocap4", IEMOCAP4),
    "bp4d12": LabelSet("bp4d12", tuple(f"AU{a}" for a in BP4D_AUS), BP4D_AUS),
    "disfa8": LabelSet("disfa8", tuple(f"AU{a}" for a in DISFA_AUS), DISFA_AUS),
}
LABEL_SETS: tuple[str, ...] = tuple(_SETS)


def label_set(name: str) -> LabelSet:
    try:
        return _SETS[name]
    except KeyError:
        raise KeyError(f"unknown label set '{name}' (known: {', '.join(_SETS)})") from None


def dfew_index(code: str) -> int:
    """DFEW's official code "1".."7" -> basic7 index."""
    name = DFEW_CODES.get(code.strip())
    if name is None:
        raise UnknownLabel(f"unknown label '{code.strip()}' (expected 1..7)")
    return BASIC7.index(name)


def ferv39k_index(name: str) -> int:
    """FERV39k emotion name ("Happy", "Sad", ...) -> basic7 index, by name: repositories disagree on its numbers."""
    canonical = FERV39K_NAMES.get(name.strip().lower())
    if canonical is None:
        raise UnknownLabel(f"unknown label '{name.strip()}' (expected one of {', '.join(n.title() for n in BASIC7)})")
    return BASIC7.index(canonical)


def rafdb_index(code: str) -> int:
    """RAF-DB basic code "1".."7" (surprise, fear, disgust, happiness, sadness, anger, neutral) -> basic7 index."""
    name = RAFDB_CODES.get(code.strip())
    if name is None:
        raise UnknownLabel(f"unknown label '{code.strip()}' (expected 1..7)")
    return BASIC7.index(name)


def affectnet_index(code: str, classes: int) -> int:
    """AffectNet expression code "0".."7" -> basic7 index (classes=7) or affectnet8 index (classes=8). Callers
    check AFFECTNET_EXCLUDED (and contempt, for 7 classes) first to count those instead."""
    name = AFFECTNET_CODES.get(code.strip())
    if name is None or (classes == 7 and name == "contempt"):
        expected = "0..6" if classes == 7 else "0..7"
        raise UnknownLabel(f"unknown label '{code.strip()}' (expected {expected}, or an excluded code: "
                           f"{', '.join(f'{c} = {n}' for c, n in AFFECTNET_EXCLUDED.items())})")
    return BASIC7.index(name) if classes == 7 else AFFECTNET8.index(name)


def basic6_index(noun: str) -> int:
    """Expression noun ("Anger", "happiness", ...) -> basic6 index."""
    name = EXPRESSION_NOUNS.get(noun.strip().lower())
    if name is None:
        raise UnknownLabel(f"unknown label '{noun.strip()}' (expected one of "
                           f"{', '.join(n.title() for n in EXPRESSION_NOUNS)})")
    return BASIC6.index(name)


def mafw_index(name: str) -> int:
    """MAFW single label name ("anger", "happiness", ...) -> mafw11 index."""
    parts = _mafw_parts(name)
    if len(parts) != 1:
        raise UnknownLabel(f"compound label '{name.strip()}' in a single-label file (expected one of "
                           f"{', '.join(MAFW_NAMES)})")
    return parts[0]


def mafw_compound(name: str) -> tuple[int, tuple[int, ...]]:
    """MAFW compound-split label ("anger_disgust" or a single "fear") -> (mafw43 index, mafw11 indices)."""
    parts = _mafw_parts(name)
    try:
        return _MAFW43_INDICES.index(parts), parts
    except ValueError:
        raise UnknownLabel(f"unknown label '{name.strip()}' (not one of MAFW's 43 compound classes)") from None


def iemocap_index(code: str) -> int:
    """IEMOCAP code ("neu", "hap", "exc", "ang", "sad") -> iemocap4 index. Codes outside the protocol are UnknownLabel;
    callers check IEMOCAP_EXCLUDED first to count those instead."""
    name = IEMOCAP_CODES.get(code.strip().lower())
    if name is None:
        raise UnknownLabel(f"unknown label '{code.strip()}' (expected one of {', '.join(IEMOCAP_CODES)}, "
                           f"or an excluded code: {', '.join(sorted(IEMOCAP_EXCLUDED))})")
    return IEMOCAP4.index(name)
