"""Tokens/s and MFU on one GPU: yoto's loop (probes off, then on) vs a bare loop.

GPT-2-124M-shaped (the gpt2-124m preset: 12 x 768, seq 1024, 50304 rows), bf16. Measured
in one process, one after another after a warm-up each:

- ``yoto_probes_off`` / ``yoto_probes_on``: ``Trainer.step_once`` (DeepSpeed bf16 engine,
  the runner's one transfer, the run store) with the default probe set on or off;
- ``bare_compiled``: the same GPT class, ``torch.compile``d, fp32 weights under bf16
  autocast, fused AdamW, gradient clipping, one ``.item()`` a step: the usual strong
  baseline (nanoGPT / llm.c style);
- the attention backends alone (eager, sdpa, flex), forward + backward of one layer's
  attention at the same shape, causal and with ALiBi.

MFU uses trainer/flops.py's count and the GPU's dense peak. Targets (issue): yoto with
probes on >= 0.9x the bare loop; MFU >= 40%.

Without CUDA it runs a reduced mode on the CPU (the tiny preset, a few steps, no
torch.compile, no flex) so the script is known to work.

The timed window (100 steps by default) spans the default 50-step cadence of the heavier
probes (layer statistics, activation headroom) twice, so "probes on" pays for them as a
whole run does; spectra run in their own process.

    .venv/bin/python benchmarks/gpu_throughput.py [--steps 100] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _common import make_trainer

from yoto.config import load_config
from yoto.trainer import engine as eng
from yoto.trainer.attention import SelfAttention
from yoto.trainer.flops import flops_per_token, mfu, peak_flops
from yoto.trainer.model import GPT, norm_factory, vocab_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def yoto_loop(
    preset: str, shape: list[str], probes: bool, steps: int, warmup: int, device: torch.device
) -> float:
    trainer = make_trainer(preset, [*shape, *([] if probes else ["probes.enabled=false"])])
    trainer._start_batch_schedule()
    for _ in range(warmup):
        trainer.step_once()
    return time_steps(trainer.step_once, steps, device)


def bare_loop(
    preset: str,
    shape: list[str],
    steps: int,
    warmup: int,
    device: torch.device,
    compile_model: bool,
) -> float:
    cfg = load_config(preset=preset, overrides=shape)
    torch.manual_seed(0)
    model = GPT(cfg.model, vocab_size(cfg)).to(device)
    optimizer = eng.make_optimizer(model, cfg, device)
    fwd = torch.compile(model) if compile_model else model
    mb, T = cfg.train.micro_batch_size, cfg.model.seq_len
    n_micro = cfg.train.global_batch_size // mb
    data = torch.randint(0, 256, (n_micro, mb, T + 1), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        for m in range(n_micro):
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = fwd(data[m, :, :-1], data[m, :, 1:])
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(warmup):
        step()
    return time_steps(step, steps, device)


def attention_alone(
    preset: str, shape: list[str], device: torch.device, backends: list[str]
) -> dict[str, dict[str, float]]:
    cfg = load_config(preset=preset, overrides=shape)
    mb, T, C = cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.d_model
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict[str, dict[str, float]] = {}
    for position in ("learned", "alibi"):
        for backend in backends:
            mcfg = cfg.model.model_copy(update={"position": position})
            mcfg.attention.backend = backend
            layer = SelfAttention(mcfg, norm_factory(mcfg)).to(device, dtype)
            x = torch.randn(mb, T, C, device=device, dtype=dtype, requires_grad=True)

            def run(layer=layer, x=x) -> None:
                layer(x).sum().backward()

            try:
                for _ in range(3):
                    run()
                seconds = time_steps(run, 10, device)
            except Exception as exc:  # e.g. flex without a backward on this device
                out[f"{backend}/{position}"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            out[f"{backend}/{position}"] = {"ms": seconds * 1e3}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=16)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        preset = "gpt2-124m"
        shape = [
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            "train.device=cuda",
            "train.precision=bf16",
            "train.zero_stage=0",
            "train.batch_warmup.start=null",
        ]
        backends = ["eager", "sdpa", "flex"]
    else:
        print("no CUDA: reduced mode on the CPU (tiny preset, no torch.compile, no flex)")
        preset, shape = "tiny", ["train.device=cpu", "train.batch_warmup.start=null"]
        args.steps, args.warmup = min(args.steps, 5), min(args.warmup, 2)
        backends = ["eager", "sdpa"]
    cfg = load_config(preset=preset, overrides=shape)
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    per_token = flops_per_token(cfg.model, vocab_size(cfg))
    peak = peak_flops(cfg.train.peak_tflops, device)
    seconds = {
        "bare_compiled" if cuda else "bare_eager": bare_loop(
            preset, shape, args.steps, args.warmup, device, cuda
        ),
        "yoto_probes_off": yoto_loop(preset, shape, False, args.steps, args.warmup, device),
        "yoto_probes_on": yoto_loop(preset, shape, True, args.steps, args.warmup, device),
    }
    bare = next(iter(seconds.values()))
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "preset": preset,
        "tokens_per_step": tokens,
        "flops_per_token": per_token,
        "loops": {},
    }
    print(f"{'loop':18s} {'tok/s':>10s} {'MFU':>7s} {'vs bare':>8s}")
    for name, sec in seconds.items():
        tps = tokens / sec
        util = mfu(tps, per_token, peak, 1)
        report["loops"][name] = {"tokens_per_second": tps, "mfu": util, "vs_bare": bare / sec}
        shown = f"{util * 100:6.1f}%" if util is not None else "      -"
        print(f"{name:18s} {tps:10,.0f} {shown} {bare / sec:8.3f}")
    report["attention"] = attention_alone(preset, shape, device, backends)
    for name, result in report["attention"].items():
        print(
            f"attention {name:16s} "
            + (f"{result['ms']:.2f} ms" if "ms" in result else result["error"])
        )
    report["median_step_seconds"] = statistics.median(seconds.values())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
