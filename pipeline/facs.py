"""FACS knowledge as data: AU descriptions, expression compositions, text forms and expression x AU priors.

The source tables live in `prompts/facs/` (SSM Table S4 and Table VIII, GRACE's emotion-descriptor phrase) and are
hashed into the cache key of whatever reads them (`source_files`). Classes are matched to affectprep.labels by their
canonical name, never by position, so a table row can never land on the wrong output index.
"""
from __future__ import annotations

import csv
import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affectprep import labels

DEFAULT = Path(__file__).resolve().parents[1] / "prompts"

# Every expression label set whose classes the table covers (AffectNet's, FER+'s and Oulu's are subsets of MAFW's
# eleven, IEMOCAP's four too); a dataset's own label set (a CSV dataset) joins them when the table covers it.
EXPRESSION_SETS = ("basic7", "basic6", "affectnet8", "ferplus8", "mafw11", "iemocap4")
AU_SETS = ("bp4d12", "disfa8")
REGIONS = ("brows", "lids", "cheeks", "nose", "lips", "chin", "jaw")
# Prior weights of the public SSM implementation (linked expression-AU pairs, all other pairs).
PRIOR_LINKED = 1.0
PRIOR_OTHER = 0.02

_AU_FILE = "facs/au_descriptions.csv"
_EXPRESSION_FILE = "facs/expressions.csv"
_PHRASE_FILE = "facs/phrases.txt"
_AU_COLUMNS = ("au", "description", "muscle", "region")
_EXPRESSION_COLUMNS = ("name", "word", "aus", "description")
_PHRASES = ("standalone", "descriptor")
_NO_AUS = "None"                       # Table S4's composition for neutral
_AU_TOKEN = re.compile(r"AU([1-9][0-9]*)")


class FacsTableError(ValueError):
    """A FACS source table that is missing or malformed. The message names the file and line."""


@dataclass(frozen=True)
class ActionUnit:
    au: int
    description: str                   # Table S4 wording, e.g. "inner brow raiser"
    muscle: str
    region: str


@dataclass(frozen=True)
class Expression:
    name: str                          # canonical name (affectprep.labels), e.g. "happy"
    word: str                          # Table S4 label, lower case, e.g. "happiness"
    aus: tuple[int, ...]               # Table S4 AU combination; () for neutral
    description: str                   # Table S4 compositional description


@dataclass(frozen=True)
class FacsTables:
    aus: dict[int, ActionUnit]
    expressions: dict[str, Expression]
    phrases: dict[str, str]            # "standalone" / "descriptor" -> str.format template with {word}

    def phrase(self, kind: str, expression: str) -> str:
        return self.phrases[kind].format(word=self.expressions[expression].word)


@dataclass(frozen=True)
class FacsAsset:
    label_set: str                     # e.g. "basic7"
    names: tuple[str, ...]             # class or AU names in the label set's canonical order
    texts: tuple[str, ...]             # one description per class/AU (Table S4 wording), for CoOp-style prompting
    words: tuple[str, ...]             # Table VIII "Words" form: "happiness"; for an AU its FACS name
    standalone: tuple[str, ...]        # Table VIII "Standalone" form: "a facial expression of happiness"
    compound: tuple[str, ...]          # Table VIII "Compound" form: the Table S4 description (= texts)
    au_ids: tuple[tuple[int, ...], ...]  # per name: its full Table S4 AU composition, or the AU's own number


@functools.lru_cache(maxsize=8)  # read once per process: the text stages ask for a descriptor per sample
def load_tables(prompts_dir: Path = DEFAULT) -> FacsTables:
    """Parse and validate the FACS source tables; FacsTableError says what is wrong and where."""
    prompts_dir = Path(prompts_dir)
    aus = _load_aus(prompts_dir / _AU_FILE)
    expressions = _load_expressions(prompts_dir / _EXPRESSION_FILE, aus)
    phrases = _load_phrases(prompts_dir / _PHRASE_FILE)
    for set_name in EXPRESSION_SETS:
        missing = [n for n in labels.label_set(set_name).names if n not in expressions]
        if missing:
            raise FacsTableError(f"{prompts_dir / _EXPRESSION_FILE}: no row for {', '.join(missing)} "
                                 f"(needed by label set {set_name})")
    for set_name in AU_SETS:
        missing = [f"AU{a}" for a in labels.label_set(set_name).au_ids if a not in aus]
        if missing:
            raise FacsTableError(f"{prompts_dir / _AU_FILE}: no row for {', '.join(missing)} "
                                 f"(needed by label set {set_name})")
    return FacsTables(aus, expressions, phrases)


def facs_asset(label_set: str, prompts_dir: Path = DEFAULT) -> FacsAsset:
    """The texts of one label set (expression or AU), in its canonical order."""
    return _asset(load_tables(prompts_dir), _facs_label_set(label_set))


def descriptor(label_set: str, class_name: str, prompts_dir: Path = DEFAULT) -> str:
    """GRACE's emotion-descriptor phrase for a class, e.g. ("basic7", "happy") -> "an emotion of happiness".

    The phrase needs no FACS knowledge, only the class's word: a dataset's own label set (kind = "csv", classes
    named in its file) gets it too, with the table's word where the table has the class and the class name as
    written otherwise ("an emotion of boredom"; a choice: GRACE's template is "an emotion of [class]")."""
    tables = load_tables(prompts_dir)
    if label_set not in labels.LABEL_SETS:
        return tables.phrases["descriptor"].format(word=tables.expressions[class_name].word
                                                   if class_name in tables.expressions else class_name)
    return _descriptor(tables, labels.label_set(label_set), class_name)


def prior_matrix(expression_set: str, au_set: str, *, linked: float = PRIOR_LINKED, other: float = PRIOR_OTHER,
                 normalise: bool = False, prompts_dir: Path = DEFAULT) -> np.ndarray:
    """(K expressions x M AUs) FACS prior: `linked` where the expression's Table S4 composition contains the AU,
    `other` elsewhere; AUs of a composition outside the AU set simply do not link. With `normalise`, each row is
    divided by its sum (SSM eq. 19); a row with no mass (neutral when other = 0) stays zero."""
    expressions, aus = _facs_label_set(expression_set), _facs_label_set(au_set)
    if expressions.is_au or not aus.is_au:
        raise ValueError(f"a prior pairs an expression set ({', '.join(EXPRESSION_SETS)}) with an AU set "
                         f"({', '.join(AU_SETS)}), got '{expression_set}' x '{au_set}'")
    if min(linked, other) < 0:
        raise ValueError(f"prior weights must be non-negative, got linked={linked}, other={other}")
    return _prior(load_tables(prompts_dir), expressions, aus, linked, other, normalise)


def source_files(prompts_dir: Path = DEFAULT) -> list[Path]:
    """Every file the FACS asset is built from: hash these into the cache key."""
    return [Path(prompts_dir) / f for f in (_AU_FILE, _EXPRESSION_FILE, _PHRASE_FILE)]


def asset_rows(prompts_dir: Path = DEFAULT, dataset_set: labels.LabelSet | None = None) -> list[dict]:
    """The whole asset as rows with the same keys: one "texts" row per label set, then one "prior" row per
    expression x AU pairing (names = the K expression names, au_names = the M AU names; prior with
    PRIOR_LINKED / PRIOR_OTHER and prior_normalised, both K x M). Keys a row kind does not use hold empty lists.

    dataset_set: a dataset's own expression label set (a CSV dataset's); it gets rows too when the table has a row
    for each of its classes."""
    tables = load_tables(prompts_dir)
    expression_sets = [labels.label_set(n) for n in EXPRESSION_SETS]
    if (dataset_set is not None and dataset_set.name not in labels.LABEL_SETS and not dataset_set.is_au
            and all(n in tables.expressions for n in dataset_set.names)):
        expression_sets.append(dataset_set)
    rows = []
    for set_labels in expression_sets + [labels.label_set(n) for n in AU_SETS]:
        set_name = set_labels.name
        asset = _asset(tables, set_labels)
        descriptors = [] if set_labels.is_au else [_descriptor(tables, set_labels, n) for n in asset.names]
        rows.append(_row(set_name, "texts", set_name, None, list(asset.names), [],
                         texts=list(asset.texts), words=list(asset.words), standalone=list(asset.standalone),
                         compound=list(asset.compound), descriptors=descriptors,
                         au_ids=[list(ids) for ids in asset.au_ids]))
    for expressions in expression_sets:
        expression_set = expressions.name
        for au_set in AU_SETS:
            aus = labels.label_set(au_set)
            prior, normalised = (_prior(tables, expressions, aus, PRIOR_LINKED, PRIOR_OTHER, normalise).tolist()
                                 for normalise in (False, True))
            rows.append(_row(f"{expression_set}+{au_set}", "prior", expression_set, au_set,
                             list(expressions.names), list(aus.names), prior=prior, prior_normalised=normalised))
    return rows


def template_fields(template: str) -> set[str]:
    """The {placeholders} of a str.format template, e.g. to check a prompt file before filling it."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def _asset(tables: FacsTables, set_labels: labels.LabelSet) -> FacsAsset:
    if set_labels.is_au:
        units = [tables.aus[a] for a in set_labels.au_ids]
        # Table S4 gives one atomic description per AU, so every text form of an AU is that description.
        texts = tuple(u.description for u in units)
        return FacsAsset(set_labels.name, set_labels.names, texts, texts, texts, texts,
                         tuple((u.au,) for u in units))
    rows = [tables.expressions[n] for n in set_labels.names]
    texts = tuple(r.description for r in rows)
    return FacsAsset(set_labels.name, set_labels.names, texts,
                     words=tuple(r.word for r in rows),
                     standalone=tuple(tables.phrase("standalone", r.name) for r in rows),
                     compound=texts,
                     au_ids=tuple(r.aus for r in rows))


def _descriptor(tables: FacsTables, set_labels: labels.LabelSet, class_name: str) -> str:
    if set_labels.is_au:
        raise ValueError(f"descriptor phrases exist for expression label sets only ({', '.join(EXPRESSION_SETS)}), "
                         f"not for the AU set '{set_labels.name}'")
    set_labels.index(class_name)       # UnknownLabel for a name outside the set
    return tables.phrase("descriptor", class_name)


def _prior(tables: FacsTables, expressions: labels.LabelSet, aus: labels.LabelSet, linked: float, other: float,
           normalise: bool) -> np.ndarray:
    prior = np.full((len(expressions), len(aus)), other, dtype=np.float32)
    for k, name in enumerate(expressions.names):
        for m, au in enumerate(aus.au_ids):
            if au in tables.expressions[name].aus:
                prior[k, m] = linked
    if normalise:
        sums = prior.sum(axis=1, keepdims=True)
        prior = np.divide(prior, sums, out=np.zeros_like(prior), where=sums > 0)
    return prior


def _row(asset_id: str, kind: str, set_name: str, au_set: str | None, names: list[str], au_names: list[str],
         **values) -> dict:
    empty = {"texts": [], "words": [], "standalone": [], "compound": [], "descriptors": [], "au_ids": [],
             "prior": [], "prior_normalised": []}
    return {"asset_id": asset_id, "kind": kind, "label_set": set_name, "au_set": au_set, "names": names,
            "au_names": au_names, **empty, **values}


def _facs_label_set(name: str) -> labels.LabelSet:
    if name not in EXPRESSION_SETS + AU_SETS:
        raise KeyError(f"no FACS table for label set '{name}' (FACS assets exist for "
                       f"{', '.join(EXPRESSION_SETS + AU_SETS)})")
    return labels.label_set(name)


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) for each line of a source file that is neither blank nor a '#' comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FacsTableError(f"missing FACS source file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FacsTableError(f"cannot read FACS source file {path}: {e}") from None
    return [(i, line) for i, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]


def _read_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row of a CSV table."""
    numbered = _content_lines(path)
    if not numbered:
        raise FacsTableError(f"{path}: no header line (expected columns {','.join(columns)})")
    header_line, header = numbered[0]
    if tuple(c.strip() for c in next(csv.reader([header]))) != columns:
        raise FacsTableError(f"{path} line {header_line}: header is '{header}', expected '{','.join(columns)}'")
    rows = []
    for number, line in numbered[1:]:
        fields = next(csv.reader([line]))
        if len(fields) != len(columns):
            raise FacsTableError(f"{path} line {number}: {len(fields)} fields, expected {len(columns)} "
                                 f"({','.join(columns)})")
        row = dict(zip(columns, (f.strip() for f in fields)))
        empty = [c for c, v in row.items() if not v]
        if empty:
            raise FacsTableError(f"{path} line {number}: empty {', '.join(empty)}")
        rows.append((number, row))
    return rows


def _load_aus(path: Path) -> dict[int, ActionUnit]:
    aus: dict[int, ActionUnit] = {}
    for number, row in _read_rows(path, _AU_COLUMNS):
        if not row["au"].isdigit() or int(row["au"]) == 0:
            raise FacsTableError(f"{path} line {number}: AU number '{row['au']}' is not a positive integer")
        au = int(row["au"])
        if au in aus:
            raise FacsTableError(f"{path} line {number}: duplicate row for AU{au}")
        if row["region"] not in REGIONS:
            raise FacsTableError(f"{path} line {number}: unknown region '{row['region']}' for AU{au} "
                                 f"(expected one of {', '.join(REGIONS)})")
        aus[au] = ActionUnit(au, row["description"], row["muscle"], row["region"])
    return aus


def _load_expressions(path: Path, aus: dict[int, ActionUnit]) -> dict[str, Expression]:
    known = {n for s in EXPRESSION_SETS for n in labels.label_set(s).names}
    expressions: dict[str, Expression] = {}
    for number, row in _read_rows(path, _EXPRESSION_COLUMNS):
        name = row["name"]
        if name not in known:
            raise FacsTableError(f"{path} line {number}: unknown class '{name}' (expected a canonical name: "
                                 f"{', '.join(sorted(known))})")
        if name in expressions:
            raise FacsTableError(f"{path} line {number}: duplicate row for class '{name}'")
        composition = _parse_composition(row["aus"], f"{path} line {number}")
        unknown = [f"AU{a}" for a in composition if a not in aus]
        if unknown:
            raise FacsTableError(f"{path} line {number}: {', '.join(unknown)} in '{row['aus']}' "
                                 f"has no row in {_AU_FILE}")
        expressions[name] = Expression(name, row["word"], composition, row["description"])
    return expressions


def _parse_composition(text: str, where: str) -> tuple[int, ...]:
    """"AU6+AU12" -> (6, 12); "None" -> ()."""
    if text == _NO_AUS:
        return ()
    tokens = [t.strip() for t in text.split("+")]
    bad = [t for t in tokens if not _AU_TOKEN.fullmatch(t)]
    if bad:
        raise FacsTableError(f"{where}: cannot read AU combination '{text}' (write it as AU6+AU12, or {_NO_AUS})")
    composition = tuple(int(t[2:]) for t in tokens)
    if len(set(composition)) != len(composition):
        raise FacsTableError(f"{where}: AU combination '{text}' lists an AU twice")
    return composition


def _load_phrases(path: Path) -> dict[str, str]:
    phrases: dict[str, str] = {}
    for number, line in _content_lines(path):
        key, sep, template = (part.strip() for part in line.partition(":"))
        if not sep or key not in _PHRASES:
            raise FacsTableError(f"{path} line {number}: expected '<kind>: <template>' with kind one of "
                                 f"{', '.join(_PHRASES)}, got '{line}'")
        if key in phrases:
            raise FacsTableError(f"{path} line {number}: duplicate phrase '{key}'")
        try:
            fields = template_fields(template)
        except ValueError as e:
            raise FacsTableError(f"{path} line {number}: template '{template}' is not valid str.format: {e}") from None
        if fields != {"word"}:
            raise FacsTableError(f"{path} line {number}: template '{template}' must use exactly the placeholder "
                                 f"{{word}} (found {', '.join(sorted(fields)) or 'none'})")
        phrases[key] = template
    missing = [k for k in _PHRASES if k not in phrases]
    if missing:
        raise FacsTableError(f"{path}: missing phrase {', '.join(missing)}")
    return phrases
