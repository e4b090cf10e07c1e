"""The DeepSpeed engine, built from yoto's config, and the few things DeepSpeed leaves out.

- The DeepSpeed config is generated (batch, ZeRO stage, precision, clipping); the
  ``deepspeed:`` config section is merged last for anything else.
- The optimizer is torch AdamW (fused on CUDA) with decay only on matrices.
- The LR is set on the optimizer's param groups each step (schedule.learning_rate), so no
  scheduler state needs checkpointing.
- The global grad norm: DeepSpeed reports it for ZeRO and mixed precision; for fp32
  without ZeRO it clips without keeping the norm, so there yoto clips itself, once.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from yoto.config import Config, deep_merge
from yoto.errors import ConfigError

from .distributed import DistInfo
from .skip_step import SkipGate, SkipStepAdamW

log = logging.getLogger("yoto")

FP16_LOSS_SCALE = {  # DeepSpeed's DynamicLossScaler defaults, spelled out
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def check_precision(cfg: Config, device: torch.device) -> None:
    """Fail before training when the device cannot run the chosen precision."""
    precision = cfg.train.precision
    if device.type == "cpu" and precision == "fp16":
        supported = False
        with contextlib.suppress(AttributeError, RuntimeError):
            supported = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        if not supported:
            raise ConfigError(
                "train.precision='fp16' is not supported on this CPU (DeepSpeed's CPU "
                "accelerator needs oneDNN fp16, which this processor lacks); use "
                "train.precision=fp32 (the CPU default) or bf16"
            )
    if device.type == "cpu" and precision == "bf16":
        native = False
        with contextlib.suppress(AttributeError, RuntimeError):
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if not native:
            log.warning(
                "train.precision=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): "
                "oneDNN emulates it, measured ~14x slower than fp32"
            )
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision='bf16' is not supported by {torch.cuda.get_device_name()}; "
            f"use fp16 (with loss scaling) or fp32"
        )


def check_model(cfg: Config, device: torch.device) -> None:
    """Model choices the device cannot train."""
    if cfg.model.attention.prefix_loss:
        raise ConfigError(
            "model.attention.prefix_loss=true was removed: inside a prefix-LM's "
            "bidirectional prefix every position sees the token it would be trained to "
            "predict, so that loss leaks the answer. Prefix-LMs now train on the targets "
            "after the prefix only (T5's convention); delete the key (a resume of a run "
            "made with it is not possible: start a new run)"
        )
    if cfg.model.attention.backend == "flex" and device.type != "cuda":
        raise ConfigError(
            "model.attention.backend='flex' trains on CUDA only (FlexAttention has no CPU "
            "backward); use auto (SDPA with an explicit mask here) or sdpa"
        )


def own_clipping(cfg: Config) -> bool:
    """True where DeepSpeed would clip without keeping the norm (fp32, no ZeRO)."""
    return cfg.train.precision == "fp32" and cfg.train.zero_stage == 0


def offload(cfg: Config) -> dict[str, Any]:
    """ZeRO-Offload's part of ``zero_optimization``: the fp32 master weights, the optimizer
    state and the optimizer's step on the host; gradients are copied there each step."""
    device = cfg.train.offload_optimizer
    return {} if device == "none" else {"offload_optimizer": {"device": device}}


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    t = cfg.train
    granularity = t.micro_batch_size * world
    if t.global_batch_size % granularity:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x ranks = {t.micro_batch_size} x {world} = {granularity}"
        )
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // granularity,
        "gradient_clipping": 0.0 if own_clipping(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, **offload(cfg)},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", **FP16_LOSS_SCALE},
        "steps_per_print": 2**62,  # yoto reports; DeepSpeed's own log lines stay quiet
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer != "none":
        # the client optimizer (torch's AdamW, or SkipStepAdamW) steps the host copy;
        # DeepSpeed would otherwise insist on its compiled CPU Adam
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.optim.skip_step.enabled:
        # DeepSpeed's ZeRO asks to be told when the client optimizer is not one it knows;
        # SkipStepAdamW is tested here at ZeRO 0, 1, 2 and 3 (tests/trainer/test_skip_step.py)
        ds["zero_allow_untested_optimizer"] = True
    return deep_merge(ds, cfg.deepspeed)


def make_optimizer(
    model: torch.nn.Module, cfg: Config, device: torch.device
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if o.skip_step.enabled:
        gate = SkipGate(o.skip_step, device)
        return SkipStepAdamW(
            groups, gate, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0
        )
    return torch.optim.AdamW(
        groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        # offloaded, the optimizer steps the host copy
        fused=device.type == "cuda" and cfg.train.offload_optimizer == "none",
    )


def skip_gate(engine: Any) -> SkipGate | None:
    """The skip-step gate of the engine's client optimizer (under DeepSpeed's wrapper, if
    any), or None when skip-step is off."""
    optimizer = engine.optimizer
    for _ in range(3):  # engine.optimizer -> the ZeRO/bf16/fp16 wrapper -> the client
        if isinstance(optimizer, SkipStepAdamW):
            return optimizer.gate
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def build_engine(model: torch.nn.Module, cfg: Config, info: DistInfo) -> Any:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model = model.to(info.device)
    optimizer = make_optimizer(model, cfg, info.device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world)
    )
    gate = skip_gate(engine)
    if gate is not None and engine.optimizer is not optimizer:
        # a wrapper computed the global norm (pre-clip) when it calls the client's step:
        # the attribute DeepSpeed's engine reads after it (get_global_grad_norm)
        wrapper = engine.optimizer
        gate.norm_source = lambda: getattr(wrapper, "_global_grad_norm", None)
    return engine


def restore_torch_linear() -> None:
    """DeepSpeed's ZeRO-3 engine replaces ``torch.nn.functional.linear`` with its own for
    the whole process (it "persists unless manually reset"). Put torch's back when a run
    is over, so that a later run in the same process (``yoto sweep``'s next) trains with
    torch's linear unless it builds a ZeRO-3 engine itself (which swaps it in again)."""
    try:
        from deepspeed.runtime.zero.partition_parameters import (
            InsertPostInitMethodToModuleSubClasses as ZeroInit,
        )
    except ImportError:
        return
    original = getattr(ZeroInit, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def clip_own(engine: Any, max_norm: float) -> torch.Tensor:
    """Global grad norm (before clipping) for the fp32/no-ZeRO path, clipping if asked.
    Called after the last micro-batch's backward, when DeepSpeed has already averaged the
    gradients over ranks. Stays on device."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def reported_grad_norm(engine: Any) -> torch.Tensor | float | None:
    """The norm DeepSpeed computed in the last step (ZeRO / mixed precision paths)."""
    return engine.get_global_grad_norm()
