"""Skip-step: an outlier update is not applied, decided on the device.

OLMo-core's remedy (its skip-step optimizers, which OLMo 3 trains with), written for
DeepSpeed: when this step's loss or global grad norm is above mean + ``sigma`` x std of
the last ``window`` steps (once half the window is filled), or not finite, the optimizer
leaves the parameters, both Adam moments and its step count exactly as they were.
Nothing is read to the host: the verdict is a 0-dim tensor that scales the whole update
by 1.0 or 0.0 (exact either way), so the step costs what an AdamW step costs plus a few
elementwise operations, and every rank takes the same verdict because its inputs are
global (the loss is all-reduced before the optimizer step, the grad norm is
DeepSpeed's global one).

Where the numbers come from. DeepSpeed's optimizer wrappers (ZeRO 1/2 and 3, bf16, fp16)
compute the global grad norm, unscale and clip, then call the client optimizer's
``step()``; each sets ``_global_grad_norm`` (pre-clip) before that call, the attribute
DeepSpeed's engine itself reads afterwards. Without a wrapper (fp32, ZeRO 0) yoto clips
itself and hands the gate its norm. A wrapper may call ``step()`` once per parameter group
(ZeRO 1/2): the verdict is taken once per training step and reused. An fp16 overflow is
DeepSpeed's to skip as before: ``step()`` is then not called, and the gate learns nothing
from that step.

The window holds every step that reached the optimizer with finite values, skipped ones
included: a lasting change of level (new data, a damaged model) widens it within a few
steps instead of freezing training; the spike detector and the policy handle that case
(a persistent spike still rolls back). The window is branch state: saved in checkpoints,
restored by a rollback or resume with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from yoto.config import SkipStepConfig


class SkipGate:
    """The recent losses and grad norms (on device) and this step's verdict.

    The trainer calls :meth:`begin` before ``engine.step()`` (with the step's global loss,
    and the grad norm when it computed it), and :meth:`end` after it; the optimizer asks
    :meth:`skip` inside its step."""

    def __init__(self, cfg: SkipStepConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.losses = torch.zeros(cfg.window, device=device)
        self.norms = torch.zeros(cfg.window, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # finite steps seen
        self.norm_source: Callable[[], torch.Tensor | float | None] = lambda: None
        self._loss: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None
        self._verdict: torch.Tensor | None = None

    # --- the trainer's side ---

    def begin(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        self._loss, self._norm, self._verdict = loss.detach().float(), grad_norm, None

    def end(self) -> torch.Tensor:
        """After the optimizer step: this step's verdict (a 0-dim bool tensor; False when
        the optimizer was not called, as on an fp16 overflow), and the window updated."""
        verdict = self._verdict
        if verdict is None:
            self._loss = self._norm = None
            return torch.zeros((), dtype=torch.bool, device=self.device)
        loss, norm = self._loss, self._inputs_norm()
        if norm is None:  # no norm this step (DeepSpeed computes none without clipping)
            norm = self.norms[self.count % self.cfg.window]
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        slot = self.count % self.cfg.window
        # a non-finite step leaves the window as it was (its slot rewritten with itself)
        self.losses[slot] = torch.where(finite, loss, self.losses[slot])
        self.norms[slot] = torch.where(finite, norm, self.norms[slot])
        self.count += finite.to(torch.int64)
        self._loss = self._norm = self._verdict = None
        return verdict

    # --- the optimizer's side ---

    def skip(self) -> torch.Tensor:
        """True (a 0-dim tensor) when this step's update must not be applied. Outside a
        training step (DeepSpeed's state initialisation) nothing is skipped."""
        if self._loss is None:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        if self._verdict is None:
            self._verdict = self._decide(self._loss, self._inputs_norm())
        return self._verdict

    def _inputs_norm(self) -> torch.Tensor | None:
        """This step's global grad norm (pre-clip), or None where there is none."""
        if self._norm is None:
            norm = self.norm_source()
            if norm is None:
                return None
            self._norm = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
        return self._norm.detach().float().reshape(())

    def _decide(self, loss: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        window, sigma = self.cfg.window, self.cfg.sigma
        n = torch.clamp(self.count, max=window)
        filled = (torch.arange(window, device=self.device) < n).float()
        ready = n >= max(2, window // 2)

        def above(history: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            mean = (history * filled).sum() / n.clamp(min=1)
            var = (((history - mean) * filled) ** 2).sum() / n.clamp(min=1)
            return value > mean + sigma * var.sqrt()

        outlier = above(self.losses, loss)
        bad = ~torch.isfinite(loss)
        if norm is not None:
            outlier = outlier | above(self.norms, norm)
            bad = bad | ~torch.isfinite(norm)
        return (ready & outlier) | bad

    def restart(self) -> None:
        """Forget the window (the context length dropped: a rewarming rollback; shorter
        sequences have a higher loss, which must not read as outliers): nothing is skipped
        until half the window has filled again, except non-finite steps."""
        self.count.zero_()

    # --- branch state ---

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.cpu(), "norms": self.norms.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        losses = state["losses"].to(self.device)
        if losses.numel() != self.cfg.window:  # the window's length changed: start afresh
            self.count.zero_()
            return
        self.losses.copy_(losses)
        self.norms.copy_(state["norms"].to(self.device))
        self.count.copy_(state["count"].to(self.device))


class SkipStepAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected; torch.optim.AdamW's arithmetic) whose
    update is skipped, exactly, when ``gate.skip()`` says so. Step counts are tensors on
    the parameters' device, so nothing is read to the host."""

    def __init__(
        self,
        params: Iterable[Any],
        gate: SkipGate,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.gate = gate

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """One AdamW step, scaled by ``apply`` (1.0, or 0.0 when the gate says skip):
        ``x * 1.0`` and ``x + 0.0`` are exact, so a skipped step leaves every value as it
        was, and an applied one is AdamW's; the gradient of a skipped step is replaced by
        zeros first, so that a non-finite one cannot leak through ``0 * inf``. Written
        with ``torch._foreach_*`` over each group's tensors (a handful of kernel calls per
        group instead of a dozen per parameter, as torch's own foreach AdamW)."""
        if closure is not None:
            raise NotImplementedError("SkipStepAdamW takes no closure")
        skip = self.gate.skip()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, skip.to(params[0].device))

    def _step_group(self, group: dict[str, Any], params: list[Any], skip: torch.Tensor) -> None:
        """AdamW over one group's parameters with a 0-dim ``skip``. The parameters of a group
        step together, so one step count (the first's) gives the bias corrections; every
        parameter's own count is kept for DeepSpeed's checkpoints."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, decay = group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        apply = (~skip).to(torch.float32)  # 0-dim: 1.0 applies the update, 0.0 leaves it out
        grads = [torch.where(skip, 0.0, p.grad) for p in params]  # zeros when skipped
        torch._foreach_add_([st["step"] for st in states], apply)
        t = states[0]["step"].clamp(min=1.0)  # a skipped first step divides by 1
        bias2_sqrt = (1 - beta2**t).sqrt()
        # the step size, 0 when skipped; the update below divides by it, so that the whole
        # update is one addcdiv: p - m / ((sqrt(v) + eps * bias2_sqrt) / (bias2_sqrt * step)),
        # AdamW's p - step * m / (sqrt(v) / bias2_sqrt + eps); a skipped step's denominator
        # is +inf (its numerator is at least eps * bias2_sqrt > 0) and m / inf an exact 0
        step = lr / (1 - beta1**t) * apply
        if decay:
            torch._foreach_mul_(params, 1 - lr * decay * apply)  # decoupled weight decay
        torch._foreach_lerp_(exp_avgs, grads, (1 - beta1) * apply)
        torch._foreach_mul_(exp_avg_sqs, 1 - (1 - beta2) * apply)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # grads 0 if skipped
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps * bias2_sqrt)
        torch._foreach_div_(denom, bias2_sqrt * step)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-1.0)
