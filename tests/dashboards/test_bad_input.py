"""Missing, empty, half-written or damaged run directories: every page says what is
wrong in a sentence, none shows a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dashboards.helpers import PAGES, app, problems, texts, visit
from yoto import runstore
from yoto.dashboards.postmortem import data


def exceptions(at) -> list[str]:
    return [str(e.value) for e in at.exception]


def test_missing_path_is_named(tmp_path: Path, yoto_runs) -> None:
    yoto_runs(tmp_path / "nope")
    at = app()
    for page in PAGES:
        visit(at, page)
        assert exceptions(at) == []
        assert any("do not exist" in e and "nope" in e for e in texts(at, "error")), page


def test_empty_root_says_there_are_no_runs(tmp_path: Path, yoto_runs) -> None:
    yoto_runs(tmp_path)
    at = app()
    for page in PAGES:
        visit(at, page)
        assert problems(at) == []
        assert any("No run directories found" in i for i in texts(at, "info")), page


def test_a_run_that_just_started_shows_messages(tmp_path: Path, yoto_runs) -> None:
    """Manifest and config only: no metrics, layers, spectra or events yet."""
    run = runstore.RunStore.create(tmp_path, "fresh", "model:\n  seq_len: 8\n").path
    (run / runstore.EVENTS).unlink()
    yoto_runs(tmp_path)
    at = app()
    for page in PAGES:
        visit(at, page)
        assert problems(at) == [], page
        if page not in ("runs", "compare"):
            assert texts(at, "info"), f"{page} says nothing about the missing data"


@pytest.fixture
def damaged(run_dir_copy: Path) -> Path:
    """A crash mid-write: a cut events line, a metrics segment cut short (a disk error:
    the run store itself renames only whole files), a stray temporary segment."""
    with open(run_dir_copy / runstore.EVENTS, "a") as f:
        f.write('{"time": 1.0, "step": 91, "kind": "spi')
    segs = runstore.segment_files(run_dir_copy)
    blob = segs[-1].read_bytes()
    segs[-1].write_bytes(blob[: len(blob) // 2])
    shutil.copy(segs[0], segs[0].with_name(segs[0].name + ".tmp"))
    return run_dir_copy


def test_damaged_segments_are_left_out_with_a_warning(damaged: Path, yoto_runs) -> None:
    yoto_runs(damaged)
    at = app()
    visit(at, "timeline")
    assert problems(at) == []
    assert any("damaged segment" in w for w in texts(at, "warning"))
    assert at.get("vega_lite_chart"), "the readable segments are still drawn"
    for page in PAGES:
        visit(at, page)
        assert exceptions(at) == [], page


def test_damaged_manifest_is_an_error_message(run_dir_copy: Path, yoto_runs) -> None:
    (run_dir_copy / runstore.MANIFEST).write_text('{"id": "x", "sta')
    yoto_runs(run_dir_copy.parent)
    at = app()
    assert exceptions(at) == []
    assert any(run_dir_copy.name in w and "damaged" in w for w in texts(at, "warning"))
    for page in PAGES:
        visit(at, page)
        assert exceptions(at) == [], page
    # the record itself is intact: the timeline still tells the story, and names the damage
    visit(at, "timeline")
    assert problems(at) == [] and at.get("vega_lite_chart")
    assert any("manifest.json is not valid JSON" in w for w in texts(at, "warning"))


def _warned(at, text: str) -> bool:
    return any(text in w for w in texts(at, "warning"))


def test_a_run_without_its_manifest_is_listed_and_drawn(run_dir_copy: Path, yoto_runs) -> None:
    """It used to vanish ('No run directories found') although its record was intact."""
    events = len(runstore.read_events(run_dir_copy))
    (run_dir_copy / runstore.MANIFEST).unlink()
    yoto_runs(run_dir_copy.parent)
    at = app()
    assert problems(at) == []
    assert _warned(at, f"`{run_dir_copy.name}` (damaged): no manifest.json")
    [table] = at.dataframe
    [row] = table.value[table.value.run == run_dir_copy.name].itertuples()
    assert (row.status, row.steps, row.rollbacks) == ("damaged", 90, 1)
    visit(at, "timeline")
    assert problems(at) == []
    assert _warned(at, "Not all of this run could be read: no manifest.json")
    assert len(at.get("vega_lite_chart")) == 3, "loss, grad norm and the diagnosis's replays"
    assert len(data.events_frame(run_dir_copy)) == events
    for page in PAGES:
        visit(at, page)
        assert exceptions(at) == [], page


def test_events_file_with_garbage_lines(run_dir_copy: Path, yoto_runs) -> None:
    lines = (run_dir_copy / runstore.EVENTS).read_text().splitlines()
    lines.insert(3, "not json")
    lines.insert(5, json.dumps(["a list", "not an event"]))
    lines.insert(7, json.dumps({"kind": "spike", "step": "soon", "data": None}))
    (run_dir_copy / runstore.EVENTS).write_text("\n".join(lines) + "\n")
    yoto_runs(run_dir_copy)
    at = app()
    message = "2 unreadable event lines skipped (lines 4, 6 of events.jsonl)"
    assert _warned(at, message), "the Runs page names the skipped lines"
    for page in ("timeline", "layers"):
        visit(at, page)
        assert problems(at) == [], page
        assert _warned(at, message), page
    # every readable line is an event on the timeline, the odd fields' one too
    assert len(data.events_frame(run_dir_copy)) == len(lines) - 2
    assert at.get("vega_lite_chart")


def test_an_invalid_config_yaml_is_named_and_the_rest_shown(run_dir_copy: Path, yoto_runs) -> None:
    """It used to read as empty: 'config.yaml has no model.seq_len'."""
    (run_dir_copy / runstore.CONFIG).write_text("model:\n  seq_len: 64\n bad: [\n")
    yoto_runs(run_dir_copy)
    at = app()
    message = "config.yaml is not valid YAML: line 3, column 2: expected <block end>"
    assert _warned(at, message), "the Runs page names it"
    for page in ("noise", "spectra"):
        visit(at, page)
        assert problems(at) == [] and at.get("vega_lite_chart"), page
        assert _warned(at, message), page
    assert not _warned(visit(at, "noise"), "has no model.seq_len")
