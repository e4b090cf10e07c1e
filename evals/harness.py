"""yoto checkpoints as an lm-evaluation-harness model: ``lm_eval --model yoto``.

``YotoLM`` loads a run's checkpoint (any ZeRO stage, through ``trainer.offline``) with the
run's own config and tokenizer, and answers the harness's three request types:

- ``loglikelihood`` (context, continuation) -> (sum of log p(continuation), is_greedy), the
  continuation's tokens scored in one forward pass of context + continuation;
- ``loglikelihood_rolling`` (document) -> its total log-likelihood, over disjoint windows
  of ``model.seq_len`` tokens (each window conditioned on the one before, as lm-eval's
  rolling windows do for every backend);
- ``generate_until`` (context, until, max_gen_toks) -> greedy continuation text.

A prefix-LM reads the context as its bidirectional prefix, the way it was trained (the
prefix is the prompt); the continuation is causal after it, so no scored token is ever
visible to the position that predicts it. Requests are scored in batches of
``batch_size``, longest first, right-padded (padding after a sequence changes none of its
positions: they attend only to earlier tokens, or within the prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from yoto import runstore
from yoto.errors import RunDirError
from yoto.trainer.data import tokenizer as tokenizers
from yoto.trainer.model import GPT
from yoto.trainer.offline import checkpoint_model, run_config

BACKEND = "yoto"  # lm_eval --model yoto --model_args run_dir=...,step=...


def newest_complete_step(run_dir: str | Path) -> int:
    complete = [
        c.step
        for c in runstore.list_checkpoints(Path(run_dir) / runstore.CHECKPOINTS)
        if c.complete
    ]
    if not complete:
        raise RunDirError(f"{run_dir} has no complete checkpoint to evaluate")
    return complete[-1]


@register_model(BACKEND)
class YotoLM(TemplateLM):
    """A yoto checkpoint behind lm-eval's LM interface (module docstring)."""

    def __init__(
        self,
        run_dir: str | None = None,
        step: int | str | None = None,
        batch_size: int | str = 8,
        device: str = "cpu",
        model: GPT | None = None,
        tokenizer: tokenizers.Tokenizer | None = None,
        prefix_lm: bool | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.attempt: int | None = None
        if model is None:
            if run_dir is None:
                raise RunDirError("the yoto model needs run_dir=RUN_DIR (and optionally step=S)")
            step = newest_complete_step(run_dir) if step in (None, "") else int(step)
            model, client = checkpoint_model(run_dir, step)
            branch = client.get("branch", client.get("state", {}))
            self.attempt = int(branch.get("attempt", 0))  # the branch the checkpoint is on
            cfg = run_config(run_dir)
            tokenizer = tokenizers.for_run(run_dir, cfg.data.eos)
            prefix_lm = cfg.model.attention.pattern == "prefix"
        self.run_dir, self.step = run_dir, None if step is None else int(step)
        self.model = model.to(device).eval()
        self.tok = tokenizer or tokenizers.ByteTokenizer()
        self.prefix_lm = bool(prefix_lm)
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = model.cfg.seq_len

    # --- what TemplateLM asks -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return [int(i) for i in self.tok.encode(string)]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **_: Any
    ) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            scored = self._score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, result in zip(chunk, scored, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One batch: (sum log p(continuation | context), all greedy) per pair."""
        rows, prefixes, spans = [], [], []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1) :]  # left-truncate
            n_cont = min(len(continuation), len(whole) - 1)
            inputs = whole[:-1]
            rows.append(inputs)
            prefixes.append(len(inputs) - n_cont + 1)  # the context tokens kept
            spans.append((len(inputs) - n_cont, len(inputs), whole[-n_cont:]))
        width = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        prefix = torch.tensor(prefixes, device=self.device) if self.prefix_lm else None
        # over every row of the embedding, padding included: the distribution the model
        # was trained and validated with (and the one an exported copy computes)
        logits = self.model(idx.to(self.device), prefix_len=prefix)  # (B, T, V)
        results = []
        for i, (a, b, cont) in enumerate(spans):
            target = torch.tensor(cont, dtype=torch.long, device=self.device)
            # positions a..b-1 predict the continuation's tokens; the softmax of those
            # only (a (B, T, V) fp32 copy would be GBs at a 50k vocabulary)
            piece = F.log_softmax(logits[i, a:b].float(), dim=-1)
            total = piece.gather(1, target[:, None]).sum()
            greedy = bool((piece.argmax(-1) == target).all())
            results.append((float(total), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(("", ""), c, t) for c, t in windows])
            out.append(sum(s for s, _ in scored))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in [r.args for r in requests]:
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = self.tok_encode(context) or [self.eot_token_id]
            made: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (ids + made)[-self.max_length :]
                idx = torch.tensor([window], dtype=torch.long, device=self.device)
                prefix = (
                    torch.tensor([min(len(ids), len(window))], device=self.device)
                    if self.prefix_lm
                    else None
                )
                logits = self.model(idx, prefix_len=prefix)[0, -1]
                nxt = int(logits.argmax())
                if nxt == self.eot_token_id:
                    break
                made.append(nxt)
                text = self.tok_decode(made)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
