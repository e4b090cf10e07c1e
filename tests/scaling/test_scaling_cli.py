"""``yoto scaling fit`` on run directories and CSV tables, and ``yoto sweep``'s plan
(grid keys, budgets), without training: run directories are written with the run store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from yoto import catalog
from yoto.cli import main
from yoto.runstore import RunStore

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def law(n: float, d: float) -> float:
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def fake_run(
    root: Path,
    name: str,
    n: float,
    d: float,
    val: dict[str, float] | None,
    sweep: str | None = None,
) -> Path:
    """A finished run directory with the summary a real run leaves."""
    extra = {"non_embedding_parameters": n}
    if sweep:
        extra["sweep"] = {"id": sweep, "index": 0, "point": {}}
    store = RunStore.create(root, name, "model: {}\n", extra=extra)
    row = {catalog.TOKENS.name: d, catalog.TRAIN_LOSS.name: 3.0}
    for source, loss in (val or {}).items():
        row[catalog.VAL_LOSS.key(source=source)] = loss
    store.write_step(0, 100, row)
    store.close("finished")
    return store.path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def grid_runs(tmp_path: Path) -> Path:
    """12 runs on Hoffmann's law, two sources (code 5% worse than prose)."""
    root = tmp_path / "runs"
    for i, n in enumerate([1e7, 1e8, 1e9, 1e10]):
        for j, d in enumerate([1e9, 1e10, 1e11]):
            loss = law(n, d)
            fake_run(root, f"r{i}{j}", n, d, {"code": loss * 1.05, "prose": loss}, sweep="s1")
    fake_run(root, "other", 5e8, 1e10, {"code": 3.0, "prose": 2.9}, sweep="s2")
    return root


def test_fit_runs_by_sweep_with_per_source_laws(grid_runs: Path, capsys) -> None:
    rc, out, err = run_cli(
        capsys, "scaling", "fit", str(grid_runs), "--sweep", "s1", "--json", "--bootstrap", "20"
    )
    assert rc == 0, err
    fits = {f["source"]: f for f in json.loads(out)}
    assert set(fits) == {"all", "code", "prose"}
    prose = fits["prose"]
    assert prose["law"] == "chinchilla" and prose["points"] == 12
    assert prose["parameter_count"] == "non-embedding"
    for key, value in LAW.items():
        assert prose["params"][key]["value"] == pytest.approx(value, rel=0.05)
    # every run's effective size is its own size (the points lie on the law)
    for run in prose["runs"]:
        assert run["effective_size"]["value"] == pytest.approx(run["N"], rel=0.05)
    assert "other" not in {r["name"] for r in prose["runs"]}


def test_fit_text_output_names_law_count_and_verdict(grid_runs: Path, capsys) -> None:
    rc, out, _ = run_cli(
        capsys, "scaling", "fit", str(grid_runs), "--sweep", "s1", "--source", "prose",
        "--bootstrap", "10",
    )  # fmt: skip
    assert rc == 0
    assert "Chinchilla law" in out and "N = non-embedding parameters" in out
    assert "source prose" in out and "performs like a" in out
    assert "source code" not in out


def test_kaplan_on_equal_tokens_and_a_sweep_that_is_not_there(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    for n in (1e5, 1e6, 1e7):
        fake_run(root, f"n{n:.0e}", n, 1e8, {"text": (1e10 / n) ** 0.1}, sweep="eq")
    rc, out, _ = run_cli(capsys, "scaling", "fit", str(root), "--json", "--bootstrap", "50")
    (result,) = json.loads(out)  # one source: no per-source fits besides the mean
    assert result["law"] == "kaplan" and "same D" in result["why"]
    assert result["params"]["alpha_N"]["value"] == pytest.approx(0.1, rel=1e-6)
    rc, _, err = run_cli(capsys, "scaling", "fit", str(root), "--law", "chinchilla")
    assert rc == 2 and "has 5 parameters (E, A, B, alpha, beta) but there are only 3" in err
    rc, _, err = run_cli(capsys, "scaling", "fit", str(root), "--sweep", "nope")
    assert rc == 2 and "no runs of sweep 'nope'" in err and "sweeps there: eq" in err


def test_runs_without_val_loss_are_named(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    fake_run(root, "a", 1e5, 1e8, {"text": 3.0})
    fake_run(root, "b", 1e6, 1e8, {"text": 2.8})
    bad = fake_run(root, "noval", 1e7, 1e8, None)
    rc, _, err = run_cli(capsys, "scaling", "fit", str(root))
    assert rc == 2 and "cannot fit runs without a validation loss" in err
    assert str(bad) in err and "no validation loss" in err and "Traceback" not in err
    rc, out, err = run_cli(capsys, "scaling", "fit", str(root), "--skip-missing", "--json")
    assert rc == 0 and f"leaving out {bad}" in err
    assert json.loads(out)[0]["points"] == 2


def test_too_few_runs_and_not_a_run(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    fake_run(root, "a", 1e5, 1e8, {"text": 3.0})
    rc, _, err = run_cli(capsys, "scaling", "fit", str(root))
    assert rc == 2 and "only 1 point(s)" in err
    rc, _, err = run_cli(capsys, "scaling", "fit", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(capsys, "scaling", "fit")
    assert rc == 2 and "give run directories (or roots) or --table CSV" in err


def test_a_damaged_run_under_a_root_is_left_out_but_named_is_an_error(
    tmp_path: Path, capsys
) -> None:
    from yoto.scaling import runs as sr

    root = tmp_path / "runs"
    a = fake_run(root, "a", 1e5, 1e8, {"text": 3.0})
    fake_run(root, "b", 1e6, 1e8, {"text": 2.8})
    broken = fake_run(root, "broken", 1e7, 1e8, {"text": 2.6})
    (broken / "manifest.json").write_text("{not json")
    records = sr.load_runs([root, a])  # a again, named: still one record
    assert sorted(r.name for r in records) == ["a", "b"]
    assert "damaged" in capsys.readouterr().err
    assert records[0].compute_6nd == 6 * 1e5 * 1e8
    rc, _, err = run_cli(capsys, "scaling", "fit", str(broken))
    assert rc == 2 and "is damaged" in err


def test_table_fit_and_table_errors(tmp_path: Path, capsys) -> None:
    table = tmp_path / "points.csv"
    rows = ["name,N,D,loss,source"]
    for n in (1e7, 1e8, 1e9, 1e10):
        for d in (1e9, 1e10, 1e11):
            rows.append(f"m{n:.0e},{n},{d},{law(n, d)},web")
    rows += [f"k{n:.0e},{n},1e9,{(1e12 / n) ** 0.2},books" for n in (1e5, 1e6, 1e7)]
    table.write_text("\n".join(rows) + "\n")
    rc, out, err = run_cli(
        capsys, "scaling", "fit", "--table", str(table), "--json", "--bootstrap", "30"
    )
    assert rc == 0, err
    fits = {f["source"]: f for f in json.loads(out)}
    assert fits["web"]["law"] == "chinchilla" and fits["books"]["law"] == "kaplan"
    assert fits["books"]["params"]["alpha_N"]["value"] == pytest.approx(0.2, rel=1e-6)

    def fails(text: str, message: str) -> None:
        table.write_text(text)
        rc, _, err = run_cli(capsys, "scaling", "fit", "--table", str(table))
        assert rc == 2 and message in err, err

    fails("N,D\n1,2\n", "has no loss column")
    fails("N,D,loss\n1e6,1e9,abc\n1e7,1e9,2\n", ":2: N, D and loss must be numbers")
    fails("N,D,loss\n0,1e9,3\n1e7,1e9,2\n", "row 2: N=0.0 (parameters must be > 0)")
    fails("N,D,loss\n1e6,0,3\n1e7,1e9,2\n", "row 2: D=0.0 (training tokens must be > 0)")
    fails("N,D,loss\n", "has a header but no rows")
    fails("", "is empty")
    rc, _, err = run_cli(capsys, "scaling", "fit", "--table", str(tmp_path / "no.csv"))
    assert rc == 2 and "does not exist" in err


# --- the sweep's plan ---------------------------------------------------------------------


def test_sweep_grid_keys_and_values() -> None:
    from yoto.errors import ConfigError
    from yoto.scaling.sweep import parse_grid, resolve_key, split_values

    assert resolve_key("position") == "model.position"  # a bare name in one section only
    assert resolve_key("model.n_layer") == "model.n_layer"
    assert split_values("[a,b],[c],d") == ["[a,b]", "[c]", "d"]
    assert parse_grid(["n_layer=2,4", "model.position=alibi,rotary"]) == [
        ("model.n_layer", ["2", "4"]),
        ("model.position", ["alibi", "rotary"]),
    ]
    for item, message in [
        ("model.n_layr=2,4", "unknown field 'model.n_layr' (did you mean 'n_layer'?)"),
        ("model.n_layr=2,4", "fields of model: n_layer, n_head, d_model"),
        ("modl.n_layer=2", "there is no section 'modl'"),
        ("enabled=true", "is a field of several sections"),
        ("postion=alibi", "did you mean 'position'"),
        ("model.n_layer", "expected key=value1,value2"),
        ("model.n_layer=2,,4", "an empty value"),
        ("model.n_layer=2,2", "a value is given twice"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_grid([item])
        assert message in str(err.value), (item, str(err.value))
    with pytest.raises(ConfigError, match="given twice; put all its values in one --grid"):
        parse_grid(["model.n_layer=2", "n_layer=4"])


def test_sweep_budgets(capsys) -> None:
    from yoto.errors import ConfigError
    from yoto.scaling.sweep import plan

    # equal tokens: a longer context trains fewer steps
    p = plan(["model.seq_len=64,128"], preset="tiny", overrides=["train.steps=100"])
    assert [pt.steps for pt in p.points] == [200, 100]
    assert len({pt.target_tokens for pt in p.points}) == 1
    assert [pt.cfg.train.steps for pt in p.points] == [200, 100]
    # compute-optimal: tokens = ratio x non-embedding parameters
    p = plan(["model.n_layer=1,2"], preset="tiny", budget="compute-optimal", tokens_per_param=2)
    n1, n2 = (pt.non_embedding_parameters for pt in p.points)
    assert n2 > n1 > 0
    for pt in p.points:
        assert pt.steps == math.ceil(2 * pt.non_embedding_parameters / pt.tokens_per_step)
    tag = p.tag(p.points[1])
    assert tag["id"] == p.id and tag["point"] == {"model.n_layer": 2}
    assert tag["budget"] == "compute-optimal" and tag["tokens_per_param"] == 2
    # steps: the grid sets the length
    p = plan(["train.steps=10,20"], preset="tiny", budget="steps")
    assert [pt.steps for pt in p.points] == [10, 20]
    with pytest.raises(ConfigError, match="use --budget steps"):
        plan(["train.steps=10,20"], preset="tiny")
    with pytest.raises(ConfigError, match=r"sweep point 1 \(model.position=foo\)"):
        plan(["model.position=alibi,foo"], preset="tiny")
    with pytest.raises(ConfigError, match="budgets are equal-tokens, compute-optimal, steps"):
        plan(["model.n_layer=1,2"], preset="tiny", budget="optimal")
    rc, _, err = run_cli(capsys, "sweep", "--grid", "model.n_layer=1,2", "--dry-run")
    assert rc == 0 and "2 runs, budget equal-tokens" in err and "(non-embedding)" in err
    rc, _, err = run_cli(capsys, "sweep", "--dry-run")
    assert rc == 2 and "a sweep needs at least one --grid" in err
