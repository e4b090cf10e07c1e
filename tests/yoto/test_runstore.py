import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from yoto import catalog, runstore
from yoto.errors import RunDirError
from yoto.events import Event, EventKind, Severity
from yoto.runstore import RunStore

LOSS, VAL = catalog.TRAIN_LOSS.name, catalog.VAL_LOSS


def make(tmp_path: Path, **kw) -> RunStore:
    return RunStore.create(
        tmp_path, "My Run!", "train:\n  steps: 3\n", extra={"world_size": 1}, **kw
    )


def test_create_writes_manifest_and_config(tmp_path: Path) -> None:
    store = make(tmp_path)
    m = json.loads((store.path / "manifest.json").read_text())
    assert m["status"] == "running" and m["name"] == "My Run!" and m["world_size"] == 1
    assert store.path.name.endswith(m["id"][-4:]) and "-my-run-" in m["id"]
    assert {"versions", "host", "pid", "heartbeat_seconds", "start", "git"} <= set(m)
    assert m["pid"] == os.getpid()
    assert (store.path / "config.yaml").read_text() == "train:\n  steps: 3\n"
    assert (store.path / "metrics").is_dir() and (store.path / "checkpoints").is_dir()


def test_rows_become_atomic_segments(tmp_path: Path) -> None:
    store = make(tmp_path, flush_every_steps=2, flush_every_seconds=1e9)
    store.write_step(0, 1, {LOSS: 5.0})
    assert runstore.segment_files(store.path) == []  # buffered
    store.write_step(0, 2, {LOSS: 4.0, VAL.key(source="code"): 4.5})
    store.write_step(0, 3, {LOSS: float("nan")})
    store.close("finished")
    files = runstore.segment_files(store.path)
    assert [f.name for f in files] == [
        "part-a0000-s0000000001-0000000002.parquet",
        "part-a0000-s0000000003-0000000003.parquet",
    ]
    assert not list((store.path / "metrics").glob("*.tmp"))
    table = runstore.read_metrics(store.path).to_pydict()
    assert table["step"] == [1, 2, 3]
    assert table[LOSS][:2] == [5.0, 4.0] and math.isnan(table[LOSS][2])
    # a column that appears in a later segment is null where it was not written
    assert table['yoto_val_loss{source="code"}'] == [None, 4.5, None]
    assert pq.read_schema(files[0]).field(LOSS).type == "double"


def test_segments_never_overwrite(tmp_path: Path) -> None:
    store = make(tmp_path, flush_every_steps=1)
    store.write_step(0, 1, {LOSS: 1.0})
    store._write_segment([{"attempt": 0, "step": 1, "time": 0.0, LOSS: 2.0}])
    assert len(runstore.segment_files(store.path)) == 2


def test_summary_in_manifest(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.write_step(0, 1, {LOSS: 3.0, catalog.TOKENS.name: 100, VAL.key(source="a"): 2.0})
    store.write_step(1, 2, {LOSS: 2.5, catalog.TOKENS.name: 200, VAL.key(source="a"): 2.2})
    store.close("halted")
    s = runstore.summarize(store.path)
    assert (s.status, s.last_step, s.tokens, s.train_loss, s.attempt) == ("halted", 2, 200, 2.5, 1)
    assert s.val_loss == {"a": 2.2} and s.best_val_loss == {"a": 2.0}
    assert runstore.last_recorded(store.path) == (1, 2)


def test_events_are_lines_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.write_event(Event(3, 0, EventKind.CHECKPOINT, Severity.INFO, "saved", {"p": Path("x")}))
    store.write_event(Event(4, 1, EventKind.ROLLBACK, Severity.WARNING, "back", {"to": 1}))
    store.close("finished")
    with open(store.path / "events.jsonl", "a") as f:
        f.write('{"time": 1, "step": 5, "ki')  # a crash mid-write
    events = runstore.read_events(store.path)
    assert [(e["step"], e["kind"], e["severity"]) for e in events] == [
        (3, "checkpoint", "info"),
        (4, "rollback", "warning"),
    ]
    assert events[0]["data"] == {"p": "x"}
    assert set(events[0]) == {"time", "step", "attempt", "kind", "severity", "message", "data"}
    report = runstore.read_events_report(store.path)
    assert (report.skipped, report.cut) == ((), 3)
    assert report.problem == "a last line cut mid-write ignored (line 3 of events.jsonl)"
    # a resume (and the chat outbox) first ends the cut line: the next event is not lost
    again = RunStore.reopen(store.path)
    again.write_event(Event(6, 1, EventKind.RESUME, Severity.INFO, "resumed", {}))
    again.close("finished")
    runstore.append_line(store.path / "events.jsonl", {"step": 7, "kind": "chat"})
    report = runstore.read_events_report(store.path)
    assert [e["step"] for e in report.events] == [3, 4, 6, 7]
    assert (report.skipped, report.cut) == ((3,), None)


def _event(step: int, kind: str = EventKind.CHECKPOINT) -> Event:
    return Event(step, 0, kind, Severity.WARNING, f"event {step}", {})


def test_garbage_event_lines_are_counted_and_named(tmp_path: Path) -> None:
    store = make(tmp_path)
    for step in range(1, 7):
        store.write_event(_event(step))
    store.close("finished")
    lines = (store.path / "events.jsonl").read_text().splitlines()
    lines.insert(1, "not json")  # line 2
    lines.insert(3, json.dumps(["a list", "not an event"]))  # line 4
    lines.insert(5, "")  # line 6: blank, holds nothing, not counted
    (store.path / "events.jsonl").write_text("\n".join(lines) + "\n")
    assert [e["step"] for e in runstore.read_events(store.path)] == [1, 2, 3, 4, 5, 6]
    report = runstore.read_events_report(store.path)
    assert (report.skipped, report.cut) == ((2, 4), None)
    message = "2 unreadable event lines skipped (lines 2, 4 of events.jsonl)"
    assert report.problem == message
    assert runstore.summarize(store.path).problems == [message]


def test_many_garbage_lines_are_counted_with_the_first_named(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.write_event(_event(1))
    store.close("finished")
    with open(store.path / "events.jsonl", "a") as f:
        f.write("garbage\n" * 8)
    problem = runstore.read_events_report(store.path).problem
    assert problem == (
        "8 unreadable event lines skipped (lines 2, 3, 4, 5, 6 and 3 more of events.jsonl)"
    )


def test_close_rejects_unknown_status(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="status 'done'"):
        make(tmp_path).close("done")


def test_reopen_marks_running_again(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.close("interrupted")
    again = RunStore.reopen(store.path)
    m = runstore.read_manifest(store.path)
    assert m["status"] == "running" and m["end"] is None and m["resumes"] == 1
    again.close("finished")
    assert runstore.read_manifest(store.path)["status"] == "finished"


def test_list_runs_newest_first(tmp_path: Path) -> None:
    a = make(tmp_path)
    a.close("finished")
    b = make(tmp_path)
    b.manifest["start"] += 10
    b.close("crashed")
    (tmp_path / "not-a-run").mkdir()
    runs = runstore.list_runs(tmp_path)
    assert [r.status for r in runs] == ["crashed", "finished"]
    assert runstore.list_runs(a.path)[0].path == a.path


def test_find_runs_takes_runs_and_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    b = RunStore.create(root, "b", "").path
    a = RunStore.create(root, "a", "").path
    (root / "not-a-run").mkdir()
    (root / "a-file").write_text("x")
    single = RunStore.create(tmp_path / "other", "c", "").path
    assert not runstore.is_run_dir(root) and runstore.is_run_dir(a)
    # a root stands for its runs, sorted by name; a run for itself; each run once
    found = runstore.find_runs([root, single, a, tmp_path / "root" / ".." / "root"])
    assert found == [*sorted([a, b]), single]
    assert runstore.find_runs([]) == []
    (tmp_path / "empty").mkdir()
    assert runstore.find_runs([tmp_path / "empty"]) == []
    with pytest.raises(RunDirError, match="'.*nothing' does not exist"):
        runstore.find_runs([root, tmp_path / "nothing"])
    with pytest.raises(RunDirError, match="is a file, not a run directory"):
        runstore.find_runs([root / "a-file"])


def test_bad_run_dirs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="does not exist"):
        runstore.read_manifest(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        runstore.read_manifest(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a run directory"):
        runstore.read_metrics(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="is damaged: manifest.json is not valid JSON"):
        runstore.read_manifest(tmp_path / "broken")
    assert runstore.summarize(tmp_path / "broken").state == runstore.DAMAGED
    with pytest.raises(RunDirError, match="does not exist"):
        runstore.list_runs(tmp_path / "nothing")


def _recorded(tmp_path: Path) -> RunStore:
    """A finished run with rows over two attempts and events, written by the run store."""
    store = make(tmp_path, flush_every_steps=4)
    for attempt, steps in ((0, range(1, 9)), (1, range(5, 11))):
        for step in steps:
            val = {VAL.key(source="code"): 3.0 + (step % 4)} if step % 2 == 0 else {}
            values = {LOSS: 5.0 - 0.1 * step, catalog.TOKENS.name: 64.0 * step, **val}
            store.write_step(attempt, step, values)
    store.write_event(_event(3, EventKind.SPIKE))
    store.write_event(_event(8, EventKind.ROLLBACK))
    store.close("finished")
    return store


def test_a_run_whose_manifest_is_deleted_is_summarised_from_the_rest(tmp_path: Path) -> None:
    store = _recorded(tmp_path)
    intact = runstore.summarize(store.path)
    (store.path / "manifest.json").unlink()
    assert runstore.is_run_dir(store.path)
    [s] = runstore.list_runs(tmp_path)
    assert (s.id, s.name, s.status, s.state) == (store.path.name, "", "unknown", "damaged")
    assert s.problems == ["no manifest.json (deleted, or never written)"]
    # what the manifest's summary said, recomputed from the metric rows
    for fact in ("last_step", "attempt", "tokens", "train_loss", "val_loss", "best_val_loss"):
        assert getattr(s, fact) == getattr(intact, fact), fact
    assert (s.last_step, s.attempt, s.best_val_loss) == (10, 1, {"code": 3.0})
    assert s.events == {"spike": 1, "rollback": 1}
    first_row = runstore.read_metrics(store.path)["time"].to_pylist()[0]
    first_event = runstore.read_events(store.path)[0]["time"]
    assert s.start == min(first_row, first_event) and s.start >= intact.start
    with pytest.raises(RunDirError, match="is damaged: no manifest.json"):
        runstore.read_manifest(store.path)


def test_a_run_whose_manifest_is_not_json_is_listed_as_damaged(tmp_path: Path) -> None:
    store = _recorded(tmp_path)
    (store.path / "manifest.json").write_text('{"id": "x", "sta')
    [s] = runstore.list_runs(tmp_path)
    assert s.state == "damaged" and s.last_step == 10
    [problem] = s.problems
    assert problem.startswith("manifest.json is not valid JSON: Unterminated string")
    (store.path / "manifest.json").write_text("[1, 2]")
    assert runstore.summarize(store.path).problems == [
        "manifest.json holds a JSON list, not an object"
    ]


def test_what_makes_a_folder_a_run_directory(tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.yaml").write_text("model: {}\n")
    assert not runstore.is_run_dir(lone)  # one part alone could be anyone's
    (lone / "events.jsonl").write_text("")
    assert runstore.is_run_dir(lone) and runstore.find_runs([tmp_path]) == [lone]
    assert not runstore.is_run_dir(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "model:\n  seq_len: 8\n bad: [\n",
            "config.yaml is not valid YAML: line 3, column 2: expected <block end>, "
            "but found '<block mapping start>'",
        ),
        ("- a\n- b\n", "config.yaml is not a mapping of sections (it holds a list)"),
    ],
)
def test_an_invalid_config_yaml_is_named(tmp_path: Path, text: str, problem: str) -> None:
    store = _recorded(tmp_path)
    (store.path / "config.yaml").write_text(text)
    assert runstore.read_config(store.path) == runstore.ConfigRead({}, problem)
    s = runstore.summarize(store.path)
    assert s.problems == [problem] and s.state == "finished" and s.last_step == 10
    (store.path / "config.yaml").write_text("")  # empty: every setting at its default
    assert runstore.read_config(store.path) == runstore.ConfigRead({})


def test_empty_run_reads_as_empty(tmp_path: Path) -> None:
    store = make(tmp_path)
    table = runstore.read_metrics(store.path)
    assert table.num_rows == 0 and table.column_names == ["attempt", "step", "time"]
    assert runstore.read_events(store.path) == []


def _manifest(**fields) -> dict:
    base = {"status": "running", "host": socket.gethostname(), "pid": os.getpid()}
    return {**base, "updated": 1000.0, "heartbeat_seconds": 30.0, **fields}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this soon)


def test_liveness_tells_a_dead_run_from_a_live_one() -> None:
    beat = 30.0
    fresh = 1000.0 + beat  # one heartbeat after the last update
    late = 1000.0 + runstore.STALE_AFTER_BEATS * beat + 1
    assert runstore.liveness(_manifest(), now=fresh) == "running"
    assert runstore.liveness(_manifest(pid=_dead_pid()), now=fresh) == runstore.CRASHED_MAYBE
    # on another host its pid says nothing: staleness does
    elsewhere = _manifest(host="some-other-node", pid=_dead_pid())
    assert runstore.liveness(elsewhere, now=fresh) == "running"
    assert runstore.liveness(elsewhere, now=late) == runstore.STALE
    # an ended run is what it says, however old
    assert runstore.liveness(_manifest(status="finished", pid=_dead_pid()), now=late) == "finished"


def test_the_heartbeat_keeps_a_quiet_run_updated_and_stops_at_close(tmp_path: Path) -> None:
    store = make(tmp_path, heartbeat_seconds=0.05, flush_every_seconds=1e9)
    first = runstore.read_manifest(store.path)["updated"]
    deadline = time.monotonic() + 30
    while runstore.read_manifest(store.path)["updated"] == first:  # no row, no event
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.02)
    assert runstore.read_manifest(store.path)["heartbeat_seconds"] == 0.05
    store.close("finished")
    store._heartbeat.join(5)
    assert not store._heartbeat.is_alive()
    assert runstore.read_manifest(store.path)["status"] == "finished"


def test_find_gaps_names_missing_steps(tmp_path: Path) -> None:
    store = make(tmp_path, flush_every_steps=1)
    for step in (1, 2, 3, 6, 7):  # 4 and 5 lost
        store.write_step(0, step, {LOSS: 1.0})
    for step in (6, 7, 8, 10):  # attempt 1 retakes 6.. after a rollback to step 5; 9 lost
        store.write_step(1, step, {LOSS: 1.0})
    store.close("finished")
    gaps = runstore.find_gaps(store.path)
    assert [str(g) for g in gaps] == [
        "steps 4-5 missing in attempt 0",
        "step 9 missing in attempt 1",
    ]
    assert [(g.attempt, g.first, g.last) for g in gaps] == [(0, 4, 5), (1, 9, 9)]


def test_find_gaps_sees_steps_no_attempt_has(tmp_path: Path) -> None:
    store = make(tmp_path, flush_every_steps=1)
    for step in (4, 5):  # 1..3 were buffered when the process died
        store.write_step(0, step, {LOSS: 1.0})
    store.close("finished")
    assert [str(g) for g in runstore.find_gaps(store.path)] == ["steps 1-3 missing in no attempt"]
