"""FACS tables, expression x AU priors and prompt templates, read from the real files in prompts/."""
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from affectprep import labels
from affectprep.pipeline import facs

PAIRINGS = [("basic7", "bp4d12"), ("basic7", "disfa8"), ("mafw11", "bp4d12"), ("mafw11", "disfa8")]
CAPTION_TEMPLATE = facs.DEFAULT / "captions" / "facs_v1.txt"
REWRITE_TEMPLATE = facs.DEFAULT / "cate" / "rewrite_v1.txt"


@pytest.mark.parametrize("set_name", facs.EXPRESSION_SETS + facs.AU_SETS)
def test_every_label_set_loads_in_canonical_order(set_name):
    asset = facs.facs_asset(set_name)
    assert asset.label_set == set_name
    assert asset.names == labels.label_set(set_name).names
    for form in (asset.texts, asset.words, asset.standalone, asset.compound, asset.au_ids):
        assert len(form) == len(asset.names)
    assert all(text.strip() for text in asset.texts)


def test_compositions_and_texts_follow_table_s4():
    basic7 = facs.facs_asset("basic7")
    by_name = dict(zip(basic7.names, zip(basic7.au_ids, basic7.texts, basic7.words, basic7.standalone)))
    assert by_name["happy"] == ((6, 12), "cheek raiser, lip corner puller", "happiness",
                                "a facial expression of happiness")
    assert by_name["sad"][0] == (1, 4, 15)
    assert by_name["neutral"][:2] == ((), "relaxed facial muscles, no significant action units")
    assert by_name["fear"][0] == (1, 2, 4, 5, 7, 20, 26)
    assert basic7.compound == basic7.texts

    mafw = facs.facs_asset("mafw11")
    mafw_by_name = dict(zip(mafw.names, zip(mafw.au_ids, mafw.texts)))
    assert mafw_by_name["contempt"] == ((12, 14), "lip corner puller, dimpler")
    assert mafw_by_name["disappointment"] == (
        (1, 4, 15, 25), "inner brow raiser, brow lowerer, slight lip corner depressor, lips part")
    # The seven basic classes read the same row whichever set they are in: rows are matched by name.
    assert mafw_by_name["happy"] == by_name["happy"][:2]

    bp4d = facs.facs_asset("bp4d12")
    assert dict(zip(bp4d.names, bp4d.texts))["AU24"] == "lip pressor"
    assert bp4d.au_ids == tuple((a,) for a in labels.BP4D_AUS)
    assert bp4d.words == bp4d.standalone == bp4d.compound == bp4d.texts


def test_au_rows_carry_muscle_and_region():
    tables = facs.load_tables()
    assert tables.aus[12].muscle == "zygomaticus major"
    assert tables.aus[1].region == "brows" and tables.aus[26].region == "jaw"


def test_every_expression_label_set_has_an_asset_and_a_dataset_set_joins_when_covered():
    for name in ("basic6", "affectnet8", "ferplus8", "iemocap4"):
        assert facs.facs_asset(name).names == labels.label_set(name).names
    covered = labels.LabelSet("csv", ("sad", "happy"))
    rows = {r["asset_id"]: r for r in facs.asset_rows(dataset_set=covered)}
    assert rows["csv"]["descriptors"] == ["an emotion of sadness", "an emotion of happiness"]
    assert np.array(rows["csv+bp4d12"]["prior"]).shape == (2, 12)
    uncovered = labels.LabelSet("csv", ("bored", "happy"))
    assert "csv" not in {r["asset_id"] for r in facs.asset_rows(dataset_set=uncovered)}
    # the descriptor phrase needs only the class word: a dataset's own names get it as written
    assert facs.descriptor("csv", "bored") == "an emotion of bored"
    assert facs.descriptor("csv", "happy") == "an emotion of happiness"


def test_descriptor_phrases_are_grace_wording():
    assert facs.descriptor("basic7", "happy") == "an emotion of happiness"
    assert facs.descriptor("mafw11", "helplessness") == "an emotion of helplessness"
    with pytest.raises(labels.UnknownLabel, match="contempt"):
        facs.descriptor("basic7", "contempt")
    with pytest.raises(ValueError, match="expression label sets only"):
        facs.descriptor("disfa8", "AU1")


@pytest.mark.parametrize("expression_set,au_set", PAIRINGS)
def test_prior_links_exactly_the_table_s4_compositions(expression_set, au_set):
    expressions, aus = labels.label_set(expression_set), labels.label_set(au_set)
    prior = facs.prior_matrix(expression_set, au_set)
    assert prior.shape == (len(expressions), len(aus))
    compositions = facs.facs_asset(expression_set).au_ids
    expected = np.array([[1.0 if au in composition else 0.02 for au in aus.au_ids] for composition in compositions],
                        dtype=np.float32)
    np.testing.assert_array_equal(prior, expected)

    normalised = facs.prior_matrix(expression_set, au_set, normalise=True)
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normalised[expressions.index("neutral")], 1.0 / len(aus), rtol=1e-6)


def test_prior_spot_checks():
    bp4d = facs.prior_matrix("basic7", "bp4d12")
    happy = bp4d[labels.BASIC7.index("happy")]
    assert [labels.BP4D_AUS[m] for m in np.flatnonzero(happy == 1.0)] == [6, 12]
    # Fear is AU1+2+4+5+7+20+26: DISFA has no AU5, AU7 or AU20, so those simply do not link.
    disfa_fear = facs.prior_matrix("basic7", "disfa8")[labels.BASIC7.index("fear")]
    assert [labels.DISFA_AUS[m] for m in np.flatnonzero(disfa_fear == 1.0)] == [1, 2, 4, 26]


def test_prior_weights_are_parameters():
    binary = facs.prior_matrix("mafw11", "disfa8", linked=1.0, other=0.0, normalise=True)
    neutral = labels.MAFW11.index("neutral")
    assert not binary[neutral].any()                       # no mass to normalise: stays zero, never NaN
    rows = np.delete(binary, neutral, axis=0)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="expression set"):
        facs.prior_matrix("bp4d12", "basic7")
    with pytest.raises(KeyError, match="mafw43"):
        facs.facs_asset("mafw43")       # compound classes have no single FACS composition


def test_asset_rows_cover_every_set_and_pairing_and_write_to_parquet(tmp_path):
    rows = facs.asset_rows()
    assert [r["asset_id"] for r in rows] == [*facs.EXPRESSION_SETS, *facs.AU_SETS,
                                             *(f"{e}+{a}" for e in facs.EXPRESSION_SETS for a in facs.AU_SETS)]
    texts = {r["asset_id"]: r for r in rows if r["kind"] == "texts"}
    assert texts["basic7"]["descriptors"][0] == "an emotion of happiness"
    assert texts["bp4d12"]["descriptors"] == []
    prior_row = next(r for r in rows if r["asset_id"] == "mafw11+bp4d12")
    assert prior_row["names"] == list(labels.MAFW11) and prior_row["au_names"] == list(labels.label_set("bp4d12").names)
    np.testing.assert_array_equal(np.array(prior_row["prior"], dtype=np.float32),
                                  facs.prior_matrix("mafw11", "bp4d12"))

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "facs.parquet")
    back = pq.read_table(tmp_path / "facs.parquet").to_pylist()
    assert [r["asset_id"] for r in back] == [r["asset_id"] for r in rows]


def test_source_files_are_the_tables():
    files = facs.source_files()
    assert all(f.is_file() for f in files)
    assert {f.name for f in files} == {"au_descriptions.csv", "expressions.csv", "phrases.txt"}


@pytest.fixture
def prompts_copy(tmp_path):
    shutil.copytree(facs.DEFAULT / "facs", tmp_path / "facs")
    return tmp_path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("file,old,new,message", [
    ("expressions.csv", "AU6+AU12", "AU6+AU99", r"expressions.csv line \d+: AU99 in 'AU6\+AU99' has no row"),
    ("expressions.csv", "AU6+AU12", "AU6 and AU12", r"cannot read AU combination 'AU6 and AU12'"),
    ("expressions.csv", "AU6+AU12", "AU6+AU6", r"lists an AU twice"),
    ("expressions.csv", "happy,happiness", "joyful,happiness", r"unknown class 'joyful'"),
    ("expressions.csv", "sad,sadness", "happy,sadness", r"duplicate row for class 'happy'"),
    ("expressions.csv", "name,word,aus,description", "name,aus,description", r"header is 'name,aus,description'"),
    ("au_descriptions.csv", "2,outer brow raiser", "1,outer brow raiser", r"duplicate row for AU1"),
    ("au_descriptions.csv", "9,nose wrinkler", "AU9,nose wrinkler", r"AU number 'AU9' is not a positive integer"),
    ("au_descriptions.csv", "zygomaticus major,lips", "zygomaticus major,mouth", r"unknown region 'mouth'"),
    ("au_descriptions.csv", "dimpler,buccinator,lips", "dimpler,buccinator", r"3 fields, expected 4"),
    ("phrases.txt", "an emotion of {word}", "an emotion of {class}", r"exactly the placeholder \{word\}"),
    ("phrases.txt", "\ndescriptor:", "\ndescriptr:", r"expected '<kind>: <template>'"),
])
def test_malformed_table_gives_a_clear_error(prompts_copy, file, old, new, message):
    _edit(prompts_copy / "facs" / file, old, new)
    with pytest.raises(facs.FacsTableError, match=message):
        facs.load_tables(prompts_copy)


def test_missing_rows_and_files_are_named(prompts_copy):
    expressions = prompts_copy / "facs" / "expressions.csv"
    expressions.write_text("\n".join(line for line in expressions.read_text().splitlines()
                                     if not line.startswith("contempt,")))
    with pytest.raises(facs.FacsTableError, match="no row for contempt .*(affectnet8|mafw11)"):
        facs.facs_asset("basic7", prompts_copy)
    (prompts_copy / "facs" / "phrases.txt").unlink()
    with pytest.raises(facs.FacsTableError, match="missing FACS source file .*phrases.txt"):
        facs.load_tables(prompts_copy)


def test_caption_template_formats_and_names_no_emotion():
    template = CAPTION_TEMPLATE.read_text()
    assert facs.template_fields(template) == {"num_frames"}
    prompt = template.format(num_frames=16)
    assert "16 frames" in prompt and "{" not in prompt
    emotion_words = {w for s in facs.EXPRESSION_SETS for w in facs.facs_asset(s).words}
    assert not emotion_words & set(re.findall(r"[a-z]+", prompt.lower()))


def test_rewrite_template_formats_with_caption_and_descriptors():
    template = REWRITE_TEMPLATE.read_text()
    assert facs.template_fields(template) == {"caption", "descriptors"}
    caption = "The person slowly raises their eyebrows and opens their mouth."
    top3 = [("surprise", 0.62), ("fear", 0.25), ("happy", 0.08)]
    descriptors = "\n".join(f"- {facs.descriptor('basic7', name)} (p = {p:.2f})" for name, p in top3)
    prompt = template.format(caption=caption, descriptors=descriptors)
    assert caption in prompt and "- an emotion of surprise (p = 0.62)" in prompt and "{" not in prompt
