"""The lm-eval backend (``--model yoto``) against direct forward passes of the same model,
and yoto's offline tasks end to end through the real harness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from yoto.config import ModelConfig

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from yoto.evals import tasks as offline
from yoto.evals.evaluate import evaluate, read_evals
from yoto.evals.harness import YotoLM
from yoto.trainer.data import tokenizer as tokenizers
from yoto.trainer.model import GPT

SEQ = 32


def small(pattern: str = "causal") -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=SEQ, attention={"pattern": pattern})
    return GPT(cfg, vocab_size=320).eval()


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def direct(model: GPT, context: list[int], continuation: list[int], prefix: int | None = None):
    """Sum of log-softmax of the continuation from one forward pass, and greediness."""
    whole = torch.tensor([context + continuation])
    p = None if prefix is None else torch.tensor([prefix])
    with torch.no_grad():
        logp = F.log_softmax(model(whole[:, :-1], prefix_len=p)[0].float(), -1)
    n = len(continuation)
    piece = logp[-n:]
    target = torch.tensor(continuation)
    return float(piece.gather(1, target[:, None]).sum()), bool((piece.argmax(-1) == target).all())


def test_loglikelihood_is_the_sum_of_log_softmax_and_greedy_is_right() -> None:
    model = small()
    lm = YotoLM(model=model, tokenizer=tokenizers.ByteTokenizer(), batch_size=3)
    enc = tokenizers.encode
    pairs = [("def add(a, b):", " return a + b"), ("The cat", " sat"), ("x", " = 1")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, got, strict=True):
        c, k = [int(i) for i in enc(context)], [int(i) for i in enc(continuation)]

        want, want_greedy = direct(model, c, k)
        assert abs(logprob - want) < 1e-5
        assert is_greedy == want_greedy
    # a continuation that is the model's own greedy choice, token by token, and one that
    # differs from it in its last token
    ctx = [int(i) for i in enc("import")]
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([ctx + greedy]))[0, -1].argmax()))
    other = [*greedy[:-1], (greedy[-1] + 1) % 257]
    scored = lm._loglikelihood_tokens([(("", ""), ctx, greedy), (("", ""), ctx, other)])
    assert [g for _, g in scored] == [True, False]
    assert abs(scored[0][0] - direct(model, ctx, greedy)[0]) < 1e-5


def test_rolling_loglikelihood_is_the_models_own_loss_over_the_document() -> None:
    model = small()
    lm = YotoLM(model=model, tokenizer=tokenizers.ByteTokenizer())
    short = "a short document, under one window"
    long = "def f(x):\n    return x * 2\n" * 4  # 112 tokens: four windows of 32
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]))
    eos = tokenizers.EOS
    for text, total in zip((short, long), got, strict=True):
        ids = tokenizers.encode(text).astype(int).tolist()
        want = 0.0
        for a in range(0, len(ids), SEQ):  # disjoint windows, each after its predecessor
            context = [eos] if a == 0 else ids[a - 1 : a]
            window = ids[a : a + SEQ]
            if a:  # the context fills the window as far as it can (lm-eval's rolling rule)
                context = ids[max(0, a + len(window) - SEQ - 1) : a]
            x = torch.tensor([context + window[:-1]])
            y = torch.tensor([[-100] * (len(context) - 1) + window])
            with torch.no_grad():
                loss = model(x, y)  # the training and validation cross-entropy
            want -= float(loss) * len(window)
        assert abs(total - want) < 1e-3, (total, want)


def test_a_prefix_lm_reads_the_context_as_its_bidirectional_prefix() -> None:
    model = small("prefix")
    lm = YotoLM(model=model, tokenizer=tokenizers.ByteTokenizer(), prefix_lm=True)
    context, continuation = "The quick brown fox", " jumps"
    c = [int(i) for i in tokenizers.encode(context)]
    k = [int(i) for i in tokenizers.encode(continuation)]
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    as_prefix, _ = direct(model, c, k, prefix=len(c))
    causal, _ = direct(model, c, k, prefix=1)  # a prefix of one token: causal attention
    assert abs(logprob - as_prefix) < 1e-5 and abs(logprob - causal) > 1e-3
    # perturbation: the first context token's change reaches the score only through the
    # later context tokens that see it both ways: with a causal context it moves less
    other = [(c[0] + 1) % 256, *c[1:]]
    moved = abs(direct(model, other, k, prefix=len(c))[0] - as_prefix)
    assert moved > 0


def test_generate_until_stops_at_the_stop_string() -> None:
    lm = YotoLM(model=small(), tokenizer=tokenizers.ByteTokenizer())
    [free] = lm.generate_until(requests("generate_until", [("x", {"max_gen_toks": 12})]))
    assert len(free.encode("utf-8", "surrogateescape")) <= 12 * 4
    stop = free[1:2] or "\n"
    [cut] = lm.generate_until(
        requests("generate_until", [("x", {"until": [stop], "max_gen_toks": 12})])
    )
    assert stop not in cut and free.startswith(cut)


def test_the_offline_tasks_are_built_from_held_out_text(tmp_path: Path) -> None:
    root = offline.materialize(tmp_path)
    held = offline.held_out_documents()
    ids = {d.id for docs in held.values() for d in docs}
    assert ids and all(offline.held_out(i, 0.02) for i in ids)
    for task in offline.TASKS:
        rows = [json.loads(x) for x in (root / f"{task}.test.jsonl").read_text().splitlines()]
        assert len(rows) >= 100, task
        assert (root / f"{task}.yaml").read_text().count("dataset_path: json") == 1
    again = offline.materialize(tmp_path / "again")
    assert (again / f"{offline.CLOZE}.test.jsonl").read_text() == (
        root / f"{offline.CLOZE}.test.jsonl"
    ).read_text()  # deterministic


@pytest.mark.slow
def test_a_trained_model_beats_chance_offline_and_an_untrained_one_does_not(
    run_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    """The fixture run (the demo's 500 steps) through the real harness, with the Hugging
    Face libraries offline; its results land in evals/. Chance: a quarter on the 4-way
    next line; on the cloze a uniform guess, perplexity V^(bytes of the word)."""
    import math

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task, limit = [offline.NEXT_LINE, offline.CLOZE], 200
    rows = (offline.materialize(tmp_path) / f"{offline.CLOZE}.test.jsonl").read_text()
    words = [json.loads(x)["target"] for x in rows.splitlines()[:limit]]
    uniform = math.exp(sum(len(" " + w) for w in words) / len(words) * math.log(320))

    step, rows = evaluate(run_copy, task, limit=limit, batch_size=16)
    score = {(r["task"], r["metric"]): r for r in rows}
    trained = score[(offline.NEXT_LINE, "acc_norm")]
    assert step == 500 and trained["value"] > 0.25 + 2 * trained["stderr"], trained
    assert score[(offline.CLOZE, "perplexity")]["value"] < uniform / 1e4
    recorded = read_evals(run_copy)
    assert {(r["step"], r["attempt"], r["task"]) for r in recorded} == {
        (500, 0, offline.NEXT_LINE),
        (500, 0, offline.CLOZE),
    }
    # the same model untrained: the yoto backend with fresh weights
    from yoto.trainer.offline import run_config

    cfg = run_config(run_copy)
    torch.manual_seed(cfg.train.seed)
    fresh = YotoLM(model=GPT(cfg.model, 320), tokenizer=tokenizers.ByteTokenizer(), batch_size=16)
    _, rows = evaluate(run_copy, task, limit=limit, write=False, model=fresh)
    score = {(r["task"], r["metric"]): r for r in rows}
    untrained = score[(offline.NEXT_LINE, "acc_norm")]
    assert untrained["value"] < 0.25 + 2 * untrained["stderr"], untrained
    assert score[(offline.CLOZE, "perplexity")]["value"] > uniform / 10


@pytest.mark.slow
def test_lm_evals_own_hf_backend_on_the_export_scores_the_same(
    run_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    """The checkpoint exported to transformers, scored by lm-eval's `hf` backend, against
    the yoto backend on the checkpoint itself: same task, limit and batch size."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from yoto.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert main(["export", str(run_copy), "--out", str(out)]) == 0
    task = [offline.NEXT_LINE, offline.CLOZE]
    _, ours = evaluate(run_copy, task, limit=60, batch_size=8, write=False)
    hf = HFLM(pretrained=str(out), backend="causal", batch_size=8, device="cpu", dtype="float32")
    _, theirs = evaluate(run_copy, task, limit=60, batch_size=8, write=False, model=hf)
    a = {(r["task"], r["metric"]): r["value"] for r in ours}
    b = {(r["task"], r["metric"]): r["value"] for r in theirs}
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])
