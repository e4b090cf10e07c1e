"""The README names metrics as the catalog does: its metric reference is the catalog's own
table, and every ``yoto_...`` name it writes anywhere is a real one."""

import re

from tests.helpers import ROOT
from yoto import catalog

README = ROOT / "README.md"
NAME = re.compile(r"yoto_[a-z0-9_]*\*?")


def test_the_metric_reference_is_generated_from_the_catalog() -> None:
    text = README.read_text()
    assert catalog.with_readme_reference(text) == text, (
        "README's metric reference is stale: run .venv/bin/python -m yoto.catalog --readme "
        "README.md"
    )
    for name in catalog.CATALOG:
        assert f"| `{name}` |" in text


def test_every_metric_name_in_the_readme_exists() -> None:
    text = README.read_text()
    wrong = []
    for name in set(NAME.findall(text)):
        if name.endswith("*"):  # a family, e.g. yoto_layer_*
            ok = any(n.startswith(name[:-1]) for n in catalog.CATALOG)
        else:
            ok = name in catalog.CATALOG
        if not ok:
            wrong.append(name)
    assert wrong == [], f"not in the catalog: {sorted(wrong)}"
    # an elided name ("..._grad_sq") reads as a metric that does not exist
    assert re.findall(r"`\.\.\._[a-z_]+`", text) == []


def test_the_readme_check_catches_a_stale_table() -> None:
    text = README.read_text()
    stale = text.replace("| `yoto_train_loss` |", "| `yoto_train_losses` |")
    assert catalog.with_readme_reference(stale) != stale
