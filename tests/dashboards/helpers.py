"""AppTest plumbing for the explorer's tests."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from yoto.dashboards import postmortem

APP = Path(postmortem.__file__).resolve().parent / "app.py"
PAGES = {  # views/ file -> title
    "runs": "Runs",
    "timeline": "Timeline",
    "noise": "Gradient noise & batch",
    "precision": "Precision",
    "layers": "Layers",
    "spectra": "Spectra",
    "compare": "Compare",
    "evals": "Evals",
    "throughput": "Throughput",
    "scaling": "Scaling",
}


def app() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    return at


def visit(at: AppTest, page: str) -> AppTest:
    return at.switch_page(f"views/{page}.py").run()


def problems(at: AppTest) -> list[str]:
    """Tracebacks and st.error messages on the page."""
    return [f"exception: {e.value}" for e in at.exception] + [f"error: {e.value}" for e in at.error]


def texts(at: AppTest, kind: str) -> list[str]:
    return [str(e.value) for e in getattr(at, kind)]
