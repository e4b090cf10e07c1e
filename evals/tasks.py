"""Offline few-shot tasks for lm-eval, built from held-out text already on the machine.

Nothing may be downloaded here, so yoto ships two small task families of its own, written
as ordinary lm-eval task YAML (``dataset_path: json`` with local ``data_files``), from
documents of the default corpus (the standard library) that its split holds out for
validation at the default ``data.val_fraction`` (0.02): no run on the default corpus
trained on them.

- ``stdlib_cloze`` (LAMBADA-style): up to 40 words of prose (held-out documentation
  and the docstrings of held-out modules), predict the word that ends the sentence.
  ``loglikelihood``; acc (the word is the greedy continuation) and perplexity (per word:
  a uniform guess over the vocabulary scores V^(bytes of the word); a byte-level model as
  small as the tiny preset gets perplexity far below that, but seldom a whole word greedy).
- ``stdlib_next_line`` (HellaSwag-style): lines of code, choose the true next line
  among it and three lines drawn from other held-out files. ``multiple_choice``; acc and
  acc_norm; chance is 0.25.

Both are deterministic functions of the Python version's standard library. ``materialize``
writes the data and YAML files into a folder and returns it, for ``--include-path``
(relative data paths would resolve against the caller's working directory).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from yoto.trainer.data.corpus import held_out
from yoto.trainer.data.documents import Document, stdlib_documents

GROUP = "stdlib_fewshot"
CLOZE, NEXT_LINE = "stdlib_cloze", "stdlib_next_line"
TASKS = (CLOZE, NEXT_LINE)
DEFAULT_VAL_FRACTION = 0.02
_VERSION = 1  # of the task data: bump when the construction changes
_PER_SPLIT = {"validation": 40, "test": 300}  # examples per split (fewshot from validation)

_HEAD_YAML = """\
tag:
  - {group}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {validation}
    test: {test}
validation_split: validation
test_split: test
fewshot_split: validation
doc_to_text: "{{{{context}}}}"
metadata:
  version: {version}
"""  # what both tasks share; each adds its output type, target and metrics

_CLOZE_YAML = """\
output_type: loglikelihood
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_CHOICE_YAML = """\
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def held_out_documents(val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, list[Document]]:
    """The default corpus's validation documents by source (the split's rule: a stable
    hash of the id below the fraction; a source's first document always trains)."""
    out: dict[str, list[Document]] = {}
    seen: set[str] = set()
    for doc in stdlib_documents():
        first = doc.source not in seen
        seen.add(doc.source)
        if doc.data and not first and held_out(doc.id, val_fraction):
            out.setdefault(doc.source, []).append(doc)
    return out


_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
_PLAIN = re.compile(r"^[A-Za-z][a-z]{2,}\.$")  # a plain word ending a sentence


def prose_of(docs: dict[str, list[Document]]) -> list[str]:
    """Held-out prose: the prose documents, and the docstrings of the held-out code."""
    texts = [d.data.decode("utf-8", errors="replace") for d in docs.get("prose", [])]
    for doc in docs.get("code", []):
        texts += _DOCSTRING.findall(doc.data.decode("utf-8", errors="replace"))
    return texts


def cloze_examples(texts: list[str]) -> list[dict[str, str]]:
    """Each sentence that ends in a plain word, with up to 40 words before it as context
    (at least 12): predict that word."""
    out = []
    for text in texts:
        words = text.split()
        for i, word in enumerate(words):
            if i < 12 or not _PLAIN.match(word):
                continue
            context = words[max(0, i - 40) : i]
            if any(c in w for w in context for c in "*`=|<>{}"):
                continue
            out.append({"context": " ".join(context), "target": word[:-1]})
    return out


def next_line_examples(docs: list[Document], seed: int = 0) -> list[dict[str, object]]:
    """Six lines of code, the true seventh and three other held-out lines as choices."""
    rng = np.random.default_rng(seed)
    files = [d.data.decode("utf-8", errors="replace").splitlines() for d in docs]
    pool = [(f, line) for f, lines in enumerate(files) for line in lines if _good_line(line)]
    out = []
    for f, lines in enumerate(files):
        for at in range(6, len(lines), 37):  # a few windows per file, spread out
            true = lines[at]
            if not _good_line(true):
                continue
            context = "\n".join(lines[at - 6 : at]) + "\n"
            others = [pool[i][1] for i in rng.permutation(len(pool))[:12] if pool[i][0] != f]
            others = [o for o in dict.fromkeys(others) if o != true][:3]
            if len(others) < 3:
                continue
            label = int(rng.integers(0, 4))
            choices = [*others[:label], true, *others[label:]]
            out.append({"context": context, "choices": choices, "label": label})
    return out


def _good_line(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 100 and not s.startswith("#")


def materialize(folder: str | Path, val_fraction: float = DEFAULT_VAL_FRACTION) -> Path:
    """Write the tasks' data and YAML into ``folder``; returns it (for --include-path)."""
    root = Path(folder).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    docs = held_out_documents(val_fraction)
    built = {
        CLOZE: (cloze_examples(prose_of(docs)), _CLOZE_YAML),
        NEXT_LINE: (next_line_examples(docs.get("code", [])), _CHOICE_YAML),
    }
    for task, (examples, template) in built.items():
        rng = np.random.default_rng([_VERSION, len(task)])
        order = [examples[i] for i in rng.permutation(len(examples))]
        n_val = min(_PER_SPLIT["validation"], len(order) // 4)
        splits = {
            "validation": order[:n_val],
            "test": order[n_val : n_val + _PER_SPLIT["test"]],
        }
        paths = {}
        for split, rows in splits.items():
            path = root / f"{task}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[split] = json.dumps(str(path))
        (root / f"{task}.yaml").write_text(
            _HEAD_YAML.format(group=GROUP, task=task, version=_VERSION, **paths) + template
        )
    return root
