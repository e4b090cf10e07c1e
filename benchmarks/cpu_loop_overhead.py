"""Tokens/s of the tiny preset on CPU: yoto's DeepSpeed loop vs a bare PyTorch loop.

Both train the same GPT (same initial weights, same batches, same AdamW, clipping and
accumulation) in one process, interleaved round by round so that noise from this shared
machine hits both alike. yoto's loop is the real one (Trainer.train_step: DeepSpeed engine,
probe runner flush, run-store rows); the bare loop is what a nanoGPT-style script does. A
third variant runs yoto's loop in bf16, which is how the CPU default precision was chosen.

    .venv/bin/python benchmarks/cpu_loop_overhead.py [--rounds 7] [--steps 15]

Prints a table and one JSON line with the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from yoto.config import load_config
from yoto.events import Sinks
from yoto.runstore import RunStore
from yoto.trainer import engine as eng
from yoto.trainer.data.sampler import Sampler
from yoto.trainer.loop import Trainer
from yoto.trainer.model import GPT, vocab_size
from yoto.trainer.run import prepare
from yoto.trainer.schedule import learning_rate

OVERRIDES = [
    "train.batch_warmup.start=null",  # constant batch: both loops do the same work each step
    "data.max_bytes_per_source=4000000",  # load the corpus quickly; throughput is unchanged
    "log.progress=false",
]


def yoto_loop(cfg, info, sampler, model, store_dir):
    engine = eng.build_engine(model, cfg, info)
    store = RunStore.create(store_dir, "bench", cfg.to_yaml())
    trainer = Trainer(cfg, engine, sampler, {}, info, Sinks(durable=store), checkpointer=None)

    def step() -> int:
        values, _ = trainer.train_step()
        trainer.sinks.write_step(0, trainer.branch.step, values)
        return engine.train_batch_size() * cfg.model.seq_len

    return step


def bare_loop(cfg, sampler, model):
    opt = eng.make_optimizer(model, cfg, torch.device("cpu"))
    mb, seq = cfg.train.micro_batch_size, cfg.model.seq_len
    n_micro = cfg.train.global_batch_size // mb
    state = {"step": 0}

    def step() -> int:
        lr = learning_rate(state["step"], cfg.optim, cfg.train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        windows = sampler.next_global_batch(cfg.train.global_batch_size)
        total = torch.zeros(())
        for micro in range(n_micro):
            tokens = sampler.micro_batch(windows, micro, 0, 1, mb)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            (loss / n_micro).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        (total / n_micro).item()  # a bare loop logs its loss too
        state["step"] += 1
        return cfg.train.global_batch_size * seq

    return step


def timed(step, n: int) -> float:
    tokens = 0
    start = time.perf_counter()
    for _ in range(n):
        tokens += step()
    return tokens / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=15, help="steps per loop per round")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 variant")
    args = ap.parse_args()

    cfg = load_config(preset="tiny", overrides=OVERRIDES)
    info, corpus, _, _, _ = prepare(cfg)
    vocab = vocab_size(cfg)

    def fresh_model() -> GPT:
        torch.manual_seed(cfg.train.seed)
        return GPT(cfg.model, vocab)

    def fresh_sampler() -> Sampler:
        return Sampler(corpus, cfg.model.seq_len, cfg.train.seed)

    tmp = tempfile.mkdtemp(prefix="yoto-bench-")
    loops = {
        "bare_pytorch_fp32": bare_loop(cfg, fresh_sampler(), fresh_model()),
        "yoto_deepspeed_fp32": yoto_loop(cfg, info, fresh_sampler(), fresh_model(), tmp),
    }
    if not args.no_bf16:
        cfg_bf16 = load_config(preset="tiny", overrides=[*OVERRIDES, "train.precision=bf16"])
        loops["yoto_deepspeed_bf16"] = yoto_loop(
            cfg_bf16, info, fresh_sampler(), fresh_model(), tmp
        )
    for step in loops.values():  # warm-up round, not measured
        timed(step, 3)
    results: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))
        for name in order:
            results[name].append(timed(loops[name], args.steps))
    med = {name: statistics.median(v) for name, v in results.items()}
    base = med["bare_pytorch_fp32"]
    print(
        f"tiny preset, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds x "
        f"{args.steps} steps, batch {cfg.train.global_batch_size} x {cfg.model.seq_len}"
    )
    print(f"{'loop':24s} {'median tok/s':>13s} {'min':>9s} {'max':>9s} {'vs bare':>8s}")
    for name, values in results.items():
        print(
            f"{name:24s} {med[name]:13,.0f} {min(values):9,.0f} {max(values):9,.0f} "
            f"{med[name] / base:8.3f}"
        )
    print(
        json.dumps(
            {
                "median_tokens_per_second": med,
                "ratio_yoto_fp32_to_bare": med["yoto_deepspeed_fp32"] / base,
                **(
                    {
                        "ratio_yoto_bf16_to_yoto_fp32": med["yoto_deepspeed_bf16"]
                        / med["yoto_deepspeed_fp32"]
                    }
                    if "yoto_deepspeed_bf16" in med
                    else {}
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
