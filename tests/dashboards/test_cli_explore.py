"""``yoto explore`` refuses paths that do not exist before starting a server (the served
app itself is tested in test_browser.py)."""

from pathlib import Path

from yoto.cli import main


def test_explore_names_a_missing_path(tmp_path: Path, capsys) -> None:
    assert main(["explore", str(tmp_path / "nope"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "no such run directory or root" in err and "nope" in err
