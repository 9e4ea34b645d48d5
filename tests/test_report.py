"""`affectprep report` on a real run (demo clips and every kind of bad input), read as HTML and in a real headless
Chromium: the page loads without console errors, shows the gallery asked for, and every image decodes."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from affectprep.pipeline.dag import describe, run_pipeline
from affectprep.report import write_report
from browser import chromium_path, visit
from pipeline_fixtures import BAD, make_project

SAMPLES = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    project = make_project(tmp, clips=7)
    run_pipeline(project, scheduler="inline", progress=False)
    # A second CATE version beside the first, to be shown side by side.
    project.stages["cate"] = {**project.stages["cate"], "top_k": 2}
    run_pipeline(project, scheduler="inline", progress=False)
    return project


@pytest.fixture(scope="module")
def page(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-out")
    return write_report(project, out, samples=SAMPLES)


def test_report_holds_the_counts_the_gallery_and_the_failures(project, page):
    text = page.read_text()
    status = describe(project)[0]
    # Every stage's line, with the counts `status` gives.
    for stage in status["stages"]:
        if stage["total"] == 0:   # audio, for a video dataset: left out of the table
            assert f"<tr><td>{stage['name']}</td>" not in text
            continue
        name = re.escape(stage["name"])   # "cate[fold 2]": one store per test fold
        row = re.search(rf"<tr><td>{name}</td><td>(\d+)</td><td>(\d+)</td><td[^>]*>(\d+)</td>", text)
        assert row, stage["name"]
        assert [int(v) for v in row.groups()] == [stage["total"], stage["done"], stage["failed"]]
    assert text.count("class='clip'") == SAMPLES
    # The gallery spreads over the classes: five clips, five different labels.
    labels = re.findall(r"label <b class='label'>(\w+)</b>", text)
    assert len(set(labels)) == SAMPLES
    # Both CATE versions for each clip, the current one marked, and a caption and top-3 for each.
    assert text.count("<div class='text current'>") == SAMPLES and text.count("<div class='text'>") == SAMPLES
    assert text.count("<ol class='top'>") == SAMPLES
    # Each bad sample is listed with its error; those whose media is readable (no face) get a thumbnail.
    for sid in BAD:
        assert f"<b>{sid}</b>" in text, sid
    media = dict((sid, cell) for cell, sid in re.findall(r"<tr class='failure'><td>((?:(?!</td>).)*)</td>"
                                                        r"<td><b>(\w+)</b>", text))
    no_face, corrupt = media["90006"], media["90001"]
    assert no_face.startswith("<img") and "data:image/jpeg;base64," in no_face and not corrupt.startswith("<img")
    # The text versions with their token counts: two cate versions, one captions version.
    # one CATE version per test fold of DFEW's five, twice (two top_k settings)
    assert text.count("<tr class='current'><td>cate</td>") == 5 and text.count("<tr class=''><td>cate</td>") == 5
    assert text.count("<tr class='current'><td>captions</td>") == 1


def test_report_opens_in_headless_chromium_without_console_errors(page, tmp_path):
    if chromium_path() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser check needs it")
    shot = tmp_path / "report.png"
    seen = visit(page.resolve().as_uri(), {
        "clips": "document.querySelectorAll('.clip').length",
        "images": "document.images.length",
        "broken": "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length",
        "strip_width": "document.querySelector('.clip img.strip').naturalWidth",
    }, screenshot=shot)
    assert seen.errors == []
    assert seen.values["clips"] == SAMPLES
    assert seen.values["broken"] == 0 and seen.values["images"] > SAMPLES
    assert seen.values["strip_width"] == 16 * 96  # sixteen aligned crops side by side
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_report_command_writes_the_page_and_rejects_an_unknown_dataset(project, tmp_path):
    cli = [sys.executable, "-m", "affectprep"]
    out = subprocess.run([*cli, "report", "--config", str(project.path), "--out", str(tmp_path / "r"),
                          "--samples", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "written:" in out.stdout and (tmp_path / "r" / "index.html").read_text().count("class='clip'") == 2
    bad = subprocess.run([*cli, "report", "--config", str(project.path), "--dataset", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown dataset" in bad.stderr and "Traceback" not in bad.stderr


def test_a_dataset_without_an_index_says_what_to_run(project, tmp_path):
    from affectprep.config import DatasetConfig, ProjectConfig

    fresh = ProjectConfig(None, tmp_path / "empty-cache", {"demo": DatasetConfig(
        "demo", "dfew", project.datasets["demo"].root)}, project.stages)
    text = write_report(fresh, tmp_path / "out").read_text()
    assert "The index is not built yet" in text and "class='clip'" not in text
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.parquet"))
    shutil.rmtree(tmp_path / "out")
