"""Typed run configuration: presets shipped in the package, a YAML file, ``--set`` overrides.

Resolution order: defaults < preset < config file < ``--set section.key=value``. Every
section forbids unknown keys, so a typo fails before training with the field's path, the
value given and what is allowed (with a "did you mean" when a field name is close).
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from yoto.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AttentionConfig(Section):
    backend: Literal["auto", "flex", "sdpa", "eager"] = Field(
        "auto",
        description="auto: FlexAttention on CUDA when there is a bias or a prefix, "
        "else SDPA (flash); SDPA with an explicit mask on CPU. eager: the readable reference",
    )
    pattern: Literal["causal", "prefix"] = Field(
        "causal",
        description="prefix: bidirectional inside a prefix, causal after it",
    )
    prefix_loss: bool | None = Field(
        None,
        description="removed: a prefix-LM trains on the targets after its prefix only. "
        "Kept so run directories of earlier runs still load (their config says true); "
        "training refuses true",
    )
    qk_norm: bool = Field(False, description="normalise queries and keys per head")


class ModelConfig(Section):
    """GPT shape and the architecture choices the BigScience group compared."""

    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    d_model: int = Field(128, ge=8, description="residual stream width")
    seq_len: int = Field(128, ge=8, description="context length in tokens")
    vocab_size: int | None = Field(
        None,
        ge=1,
        description="embedding rows; None = the tokenizer's vocabulary padded to a multiple "
        "of 64 (set 50304 to match GPT-2's shape and FLOPs)",
    )
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / d_model")
    mlp_hidden: int | None = Field(
        None,
        ge=1,
        description="MLP hidden width; None = mlp_ratio x d_model, x 2/3 for GLU "
        "activations so the parameter count matches",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(True, description="biases in linear layers and norms")
    position: Literal["learned", "sinusoidal", "rotary", "alibi", "none"] = "learned"
    activation: Literal["gelu", "relu", "relu2", "geglu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    embed_norm: bool = Field(False, description="a norm after the token embedding (BLOOM)")
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    tie_embeddings: bool = True
    init_std: float = Field(
        0.02, gt=0, description="std of weights; residual outputs get init_std / sqrt(2 * n_layer)"
    )
    z_loss: float = Field(
        0.0,
        ge=0.0,
        description="PaLM's z-loss coefficient (1e-4 there; 0 = off): the training loss adds "
        "z_loss x mean(log^2 Z), log Z the output logits' log-partition (fp32), reported as "
        "yoto_z_loss; yoto_train_loss and the validation loss stay the cross-entropy",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} must be a multiple of model.n_head={self.n_head}"
            )
        if self.position == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.position='rotary' needs an even head width; d_model / n_head = "
                f"{self.d_model // self.n_head}"
            )
        return self


class DataConfig(Section):
    paths: list[str] = Field(
        default_factory=list,
        description="text files or folders, .jsonl (a 'text' field, optional 'source'), "
        ".parquet; 'name=path' names the source. Empty: the Python standard library's "
        "own sources and docs",
    )
    tokenizer: str = Field(
        "bytes",
        description="'bytes' (256 byte values + end-of-document), or the path of a "
        "Hugging Face tokenizer.json (or a folder holding one); `yoto tokenizer train` "
        "makes a byte-level BPE",
    )
    eos: str | None = Field(
        None,
        description="end-of-document token of a tokenizer file; unset: the first of "
        "<|endoftext|>, </s>, <|end_of_text|>, <eos> in its vocabulary",
    )
    text_field: str = "text"
    source_field: str = "source"
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="held out per source")
    max_bytes_per_source: int | None = Field(None, ge=1024)
    alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="source mixture: sampled with probability ~ "
        "size^alpha (1 = in proportion to size, 0 = uniform; mT5 used 0.3)",
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".rst", ".py", ".jsonl", ".parquet"],
        description="file types read when a path is a folder",
    )


class SkipStepConfig(Section):
    """Skip-step (OLMo-core): a step whose loss or global grad norm is above mean + sigma x
    std of the last ``window`` steps (or not finite) applies no update and leaves the Adam
    moments as they were; decided on the device, the same on every rank
    (trainer/skip_step.py). Active once half the window is filled."""

    enabled: bool = Field(False, description="replaces AdamW by yoto's SkipStepAdamW")
    sigma: float = Field(6.0, gt=0.0, description="outlier: above mean + sigma x std")
    window: int = Field(128, ge=4, description="recent steps the mean and std are taken over")


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR / peak LR")
    warmup_steps: int = Field(20, ge=0)
    decay_steps: int | None = Field(
        None, ge=1, description="steps over which the LR decays; None = train.steps"
    )
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 = off")
    skip_step: SkipStepConfig = Field(default_factory=SkipStepConfig)


class BatchWarmupConfig(Section):
    """Linear ramp of the global batch from ``start`` to train.global_batch_size over
    ``tokens`` training tokens (GPT-3 / BigScience style), via engine.set_train_batch_size."""

    start: int | None = Field(None, ge=1, description="sequences; None = no warmup")
    tokens: int = Field(0, ge=0)


class SeqWarmupConfig(Section):
    """Sequence-length warmup (Li et al., "The Stability-Efficiency Dilemma"; DeepSpeed's
    sequence-length curriculum): the context grows from ``start`` to ``model.seq_len`` over
    ``tokens`` training tokens, by truncating the packed windows. The global batch stays
    the same number of sequences (the batch schedule's), so a short step trains fewer
    tokens; both warmups read one clock, the training tokens consumed. Validation always
    uses the full ``model.seq_len``."""

    start: int | None = Field(
        None,
        ge=8,
        description="first context length, tokens (rounded down to a multiple "
        "of 8); None = no warmup",
    )
    tokens: int = Field(0, ge=0, description="training tokens over which it reaches model.seq_len")
    schedule: Literal["linear", "root"] = Field(
        "linear", description="linear in tokens, or root: start + (end - start) x sqrt(progress)"
    )


class AdaptiveBatchConfig(Section):
    """Global batch from the gradient noise scale (Pollux/AdaScale style), after warmup:
    target = clamp(k * B_noise) rounded down to micro-batch x ranks."""

    enabled: bool = False
    k: float = Field(1.0, gt=0, description="target batch / B_noise")
    min: int | None = Field(None, ge=1, description="sequences; None = train.global_batch_size")
    max: int | None = Field(None, ge=1, description="sequences; None = 8 x the minimum")
    every: int = Field(50, ge=1, description="steps between changes, at least")
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "sqrt", description="LR x (batch / train.global_batch_size)^p, p = 0, 1/2, 1"
    )
    after_rollback: float = Field(
        1.0, ge=1.0, description="multiply the batch by this after a rollback (1 = keep)"
    )


class TrainConfig(Section):
    steps: int = Field(300, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-batch")
    global_batch_size: int = Field(16, ge=1, description="sequences per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none",
        description="cpu: ZeRO-Offload, the optimizer state and its step on the host (ZeRO 1-3)",
    )
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_warmup: BatchWarmupConfig = Field(default_factory=BatchWarmupConfig)
    seq_warmup: SeqWarmupConfig = Field(default_factory=SeqWarmupConfig)
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="dense bf16/fp16 peak per device for MFU; None = from the "
        "GPU's name (A100 312, H100 989, ...), no MFU on CPU",
    )
    adaptive_batch: AdaptiveBatchConfig = Field(default_factory=AdaptiveBatchConfig)

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(
                f"train.offload_optimizer={self.offload_optimizer!r} needs a ZeRO stage that "
                f"partitions the optimizer: set train.zero_stage to 1, 2 or 3 (it is 0)"
            )
        start = self.batch_warmup.start
        if start is not None and start > self.global_batch_size:
            raise ValueError(
                f"train.batch_warmup.start={start} must not exceed "
                f"train.global_batch_size={self.global_batch_size}"
            )
        return self


class HarnessConfig(Section):
    """Few-shot evaluation during training (lm-eval, in a background process): the newest
    complete checkpoint every ``every`` steps. Needs `pip install 'yoto[eval]'`."""

    every: int = Field(0, ge=0, description="steps between evaluated checkpoints; 0 = off")
    tasks: list[str] = Field(
        default_factory=lambda: ["stdlib_next_line", "stdlib_cloze"],
        description="lm-eval tasks (yoto's offline ones by default)",
    )
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(200, ge=1, description="examples per task; None = all")
    batch_size: int = Field(8, ge=1)
    device: str = Field("cpu", description="where the evaluator runs (cpu keeps GPUs free)")
    end_timeout_seconds: float = Field(
        300.0, ge=0, description="how long the end of a run waits for one still running"
    )


class EvalConfig(Section):
    every: int = Field(50, ge=0, description="steps between validations; 0 = only at the end")
    batches: int = Field(4, ge=1, description="micro-batches per source and rank")
    harness: HarnessConfig = Field(default_factory=HarnessConfig)


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept")


class LogConfig(Section):
    progress: bool = Field(True, description="progress bar on rank 0")
    flush_every_steps: int = Field(50, ge=1, description="metric rows per Parquet segment")
    flush_every_seconds: float = Field(30.0, gt=0, description="or sooner, by wall clock")


class SigmaRuleConfig(Section):
    """Outlier: value > mean + k * sigma of the window (OLMo-core). With ``log`` the rule
    runs on log(value): multiplicative noise, as grad norms have, then has one sigma."""

    enabled: bool = True
    k: float = Field(6.0, gt=0)
    window: int = Field(128, ge=4)
    log: bool = False


class RatioRuleConfig(Section):
    """Outlier: value >= ratio x window mean; spike after `patience` outliers (Composer)."""

    enabled: bool = True
    ratio: float = Field(2.0, gt=1.0)
    window: int = Field(100, ge=4)
    patience: int = Field(4, ge=0)


class EwmRuleConfig(Section):
    """Outlier: value > ratio x exponentially weighted mean of span `span` (metaseq)."""

    enabled: bool = True
    span: float = Field(9.0, ge=1.0)
    ratio: float = Field(1.5, gt=1.0)


class SeriesSpikeConfig(Section):
    sigma: SigmaRuleConfig = Field(default_factory=SigmaRuleConfig)
    ratio: RatioRuleConfig = Field(default_factory=RatioRuleConfig)
    ewm: EwmRuleConfig = Field(default_factory=EwmRuleConfig)


def _grad_norm_rules() -> SeriesSpikeConfig:
    # grad norms are heavy-tailed and multiplicative: judged in log space, with ratios a
    # clean run does not reach (a real grad spike is orders of magnitude, e.g. BLOOM's
    # 0.24 -> 960); calibrated on clean tiny runs, where a single step reaches ~4x its mean
    return SeriesSpikeConfig(
        sigma=SigmaRuleConfig(log=True),
        ratio=RatioRuleConfig(ratio=3.0),
        ewm=EwmRuleConfig(ratio=5.0),
    )


class SpikesConfig(Section):
    enabled: bool = True
    min_history: int = Field(32, ge=2, description="healthy values before a rule may fire")
    score_window: int = Field(100, ge=1, description="steps in yoto_spike_score_ratio")
    persistent_steps: int = Field(
        5, ge=2, description="a spike episode this long is persistent (a second verdict)"
    )
    loss: SeriesSpikeConfig = Field(default_factory=SeriesSpikeConfig)
    grad_norm: SeriesSpikeConfig = Field(default_factory=_grad_norm_rules)


class GradNoiseConfig(Section):
    enabled: bool = True
    every: int = Field(1, ge=1)
    ema: float = Field(0.95, ge=0.0, lt=1.0, description="decay of the |G|^2 and tr(Sigma) EMAs")
    reset_on_batch_change: bool = Field(
        False,
        description="restart the EMAs when the batch changes (the estimates are per "
        "sequence, so by default they carry over)",
    )


class PrecisionConfig(Section):
    enabled: bool = True
    every: int = Field(1, ge=1, description="loss scale and overflow bookkeeping")
    detail_every: int = Field(50, ge=1, description="activation headroom and grad underflow")


class LayersConfig(Section):
    enabled: bool = True
    every: int = Field(50, ge=1)
    attention_heads: int = Field(2, ge=1, description="heads sampled for attention stats")
    attention_rows: int = Field(32, ge=1, description="query rows sampled per sequence")


class SpectraConfig(Section):
    enabled: bool = True
    every: int = Field(500, ge=1, description="steps between weightwatcher analyses")
    min_evals: int = Field(10, ge=2, description="smallest matrix dimension analysed")
    svd_method: Literal["fast", "accurate"] = "accurate"
    source: Literal["auto", "live", "checkpoint"] = Field(
        "auto",
        description="where the analysed weights come from: live (rank 0 copies the model's "
        "weights to the host on the step), checkpoint (the newest complete checkpoint, read "
        "by the worker one matrix at a time; needs checkpoint.every), auto (live at ZeRO "
        "0-2, checkpoint at ZeRO-3, where no rank holds the full weights)",
    )
    alpha_low: float = Field(2.0, description="below: over-trained / heavy-tailed")
    alpha_high: float = Field(6.0, description="above: under-trained or a bad fit")
    band_min_evals: int = Field(
        200,
        ge=2,
        description="matrices with fewer eigenvalues leave the band as info, not "
        "warning: their power-law fits are too noisy to page anyone",
    )
    end_timeout_seconds: float = Field(
        600.0, ge=0, description="at the end of a run, wait this long for an analysis in flight"
    )


class SystemConfig(Section):
    """Per-rank and system health (probes/system.py). Every ``every`` steps one all-gather
    of each rank's own step time, data wait and (CUDA) peak memory; none with one rank."""

    enabled: bool = True
    every: int = Field(10, ge=1, description="steps between the per-rank all-gathers")
    straggler_margin: float = Field(
        0.2, gt=0, description="a rank slower than the median by more than this fraction"
    )
    straggler_intervals: int = Field(
        3, ge=1, description="... for this many intervals in a row is a straggler (a verdict)"
    )
    rank_series_max: int = Field(
        16,
        ge=1,
        description="per-rank series recorded and exported per interval: every rank up to "
        "this world size, else the slowest this many (the verdict judges every rank)",
    )
    nvml_interval_seconds: float = Field(
        1.0, gt=0, description="GPU power, temperature, utilisation and clocks read this often"
    )


class ProbesConfig(Section):
    enabled: bool = True
    max_failures: int = Field(3, ge=1, description="failures in a row before a probe is off")
    spikes: SpikesConfig = Field(default_factory=SpikesConfig)
    grad_noise: GradNoiseConfig = Field(default_factory=GradNoiseConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    layers: LayersConfig = Field(default_factory=LayersConfig)
    spectra: SpectraConfig = Field(default_factory=SpectraConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)


Action = Literal["none", "skip_step", "alert", "rollback", "lr_cooldown", "batch_size", "halt"]


class DiagnoseConfig(Section):
    """Replay diagnosis (trainer/diagnose.py): after a rollback restored its checkpoint and
    before it skips data, the original steps are replayed up to the onset plus
    ``after_onset`` on the same data and compared with the recorded losses and grad norms:
    not reproduced -> ``nondeterministic`` (hardware, silent corruption; the rank whose
    local loss differs is named); reproduced, and gone when the onset batches are replaced
    -> ``data``; still there -> ``state``. Then the checkpoint is restored again, so the
    replays leave nothing behind but the ``diagnosis`` event."""

    enabled: bool = Field(True, description="replay before each rollback, within the budget")
    after_onset: int = Field(2, ge=0, description="steps replayed past the onset")
    max_steps: int = Field(
        256, ge=1, description="replayed steps per diagnosis (both replays); else not run"
    )
    max_seconds: float = Field(300.0, gt=0, description="a replay past this is cut short")
    tolerance: float | None = Field(
        None,
        ge=0,
        description="relative difference of a replayed loss or grad norm still counted as "
        "the same; default 0 on CPU (bit-exact), 1e-3 on CUDA (nondeterministic kernels)",
    )
    gone_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="the spike counts as gone when the replay without the onset batches "
        "peaks below this fraction of the original's peak (log ratio to the pre-onset level)",
    )
    on_data: Literal["skip", "skip_onset"] = Field(
        "skip",
        description="skip: the rollback's planned skip (onset plus skip_margin batches); "
        "skip_onset: only the batches from the onset to the rollback",
    )
    on_state: Literal["skip", "lr_cooldown"] = Field(
        "lr_cooldown",
        description="lr_cooldown: also cool the LR (rollback.lr_cooldown_factor, or 0.5 for "
        "lr_cooldown_steps or 100 steps)",
    )
    on_nondeterministic: Literal["rollback", "halt"] = Field(
        "rollback", description="halt: stop the run and name the rank and host to replace"
    )

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:  # policy.rollback.diagnose=false
        return {"enabled": value} if isinstance(value, bool) else value


class ForensicsConfig(Section):
    """Spike forensics (trainer/diagnose.py): at a spike, the onset step's sequences are
    scored again with the current weights (a no-grad forward, each rank its own
    micro-batches) and the spike event names the top ones by loss: source, document,
    offset, a snippet; with the batch's tokens per source beside the mixture's share."""

    enabled: bool = True
    top_k: int = Field(5, ge=1, le=100, description="sequences named per spike")
    snippet_chars: int = Field(80, ge=0, le=2000)


class RollbackConfig(Section):
    """PaLM-like: restart from a checkpoint before the spike, skip the data in between."""

    min_distance: int = Field(20, ge=0, description="steps a checkpoint must precede the onset by")
    healthy_steps: int = Field(
        20, ge=0, description="healthy steps after a checkpoint before it counts as good"
    )
    skip_margin: int = Field(
        50,
        ge=0,
        description="batches skipped past the onset, beyond those between the "
        "checkpoint and the onset (PaLM skipped 200-500 at 540B)",
    )
    lr_cooldown_factor: float = Field(1.0, gt=0, le=1.0, description="LR x this after it")
    lr_cooldown_steps: int = Field(0, ge=0, description="for this many steps (0 = none)")
    rewarm: bool = Field(
        False,
        description="re-run train.seq_warmup's length ramp from the checkpoint a rollback "
        "goes back to (short contexts first again); needs train.seq_warmup.start",
    )
    max_rollbacks: int = Field(3, ge=1, description="within window_steps, then halt")
    window_steps: int = Field(1000, ge=1)
    diagnose: DiagnoseConfig = Field(
        default_factory=DiagnoseConfig,
        description="why did it spike: data, state or nondeterministic (a replay)",
    )


class EpisodeConfig(Section):
    """One instability, one page (trainer/episodes.py). The steps whose decision acted on
    verdicts (any action from skip_step up) are grouped into an *episode*: its onset, the
    rules that fired, the peak of each series. An episode pages (one ``alert`` event, which
    goes to chat) at most once, when it is confirmed; its later verdicts are ``episode``
    events (info, not sent). A rollback or a halt is itself the page: its event carries the
    episode. An update skip-step absorbed never pages, and a one-step outlier that is quiet
    afterwards closes unpaged."""

    quiet_steps: int = Field(
        10,
        ge=1,
        description="an episode closes after this many steps without an acted-on verdict "
        "(then one info event summarises it)",
    )
    page_after: int = Field(
        2,
        ge=1,
        description="confirmed, and paged, once verdicts that alert came on this many "
        "distinct steps (1: at the first); a critical verdict, an LR cooldown or a "
        "batch-size change confirm it at once",
    )


class PolicyConfig(Section):
    """What to do about each kind of verdict. The most severe action of a step wins and
    every rank takes it. What pages is decided per episode (``episode``): an action of
    alert or above pages once per instability episode, a rollback or halt by its own
    event; skip_step never pages."""

    enabled: bool = True
    nonfinite: Action = "rollback"
    persistent_spike: Action = "rollback"
    spike: Action = Field(
        "skip_step",
        description="skip_step: an event when optim.skip_step skipped the update, else an "
        "alert (as when skip-step is off), which pages once its episode is confirmed",
    )
    loss_scale_min: Action = Field(
        "rollback", description="then halt (with advice to use bf16) if it happens again"
    )
    overflow: Action = "none"
    spectra: Action = "none"
    probe_failure: Action = "none"
    straggler: Action = Field(
        "none",
        description="a straggler rank: its straggler event (a warning) is the page, in chat "
        "and as YotoStragglerRank; no action and no instability episode by default (a slow "
        "rank is no bad step)",
    )
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    forensics: ForensicsConfig = Field(
        default_factory=ForensicsConfig, description="which sequences a spike trained on"
    )
    episode: EpisodeConfig = Field(
        default_factory=EpisodeConfig,
        description="groups verdicts into episodes: one page per episode, not per verdict",
    )


class LiveConfig(Section):
    """The live sinks on rank 0: the Prometheus exporter (dashboards/live/exporter.py) and
    TensorBoard event files (dashboards/live/tensorboard.py)."""

    metrics_addr: str = Field(
        "127.0.0.1:9477",
        description="HOST:PORT of /metrics (port 0: any free port; 0.0.0.0:PORT to be "
        "scraped from another machine); '0' turns the exporter off",
    )
    port_search: int = Field(
        10, ge=0, description="when the port is busy, try this many following ports (0: fail)"
    )
    layer_series_max: int = Field(
        1000, ge=0, description="per-layer series exported at most, spread over the depth"
    )
    linger_seconds: float = Field(
        30.0,
        ge=0,
        description="at the end, keep /metrics up until one more scrape (at most this "
        "long; only when something has been scraping) so Prometheus sees the run end",
    )
    tensorboard: str = Field(
        "",
        description="folder for TensorBoard event files, one TensorBoard run per attempt "
        "(DIR/<run id>/attempt-N); empty: off. Needs pip install 'yoto[tensorboard]'",
    )


class NotifyConfig(Section):
    """Chat messages from the trainer itself, through Apprise (alerts/notifier.py)."""

    webhook_urls: list[str] = Field(
        default_factory=list,
        description="Apprise URLs (slack://, discord://, msteams://, mmost://, json://...); "
        "redacted in the saved config, so prefer urls_env or urls_file",
    )
    urls_env: str = Field("YOTO_NOTIFY_URLS", description="environment variable with URLs")
    urls_file: str | None = Field(None, description="file with one URL per line")
    min_severity: Literal["info", "warning", "critical"] = "warning"
    exclude_kinds: list[str] = Field(
        default_factory=lambda: [
            "checkpoint",
            "probe",
            "spike",
            "overflow",
            "skip_step",
            "episode",
        ],
        description="event kinds never sent. What pages: one alert event per instability "
        "episode (policy.episode), or the rollback or halt event that ends it; the spike "
        "verdicts themselves, an update skip-step absorbed and the episode's own updates "
        "and summary are events, not pages",
    )
    link: str | None = Field(
        None,
        description="dashboard link in each message; {run}, {name}, {step} are filled in, "
        "e.g. http://grafana:3000/d/yoto-overview?var-run={run}",
    )
    queue_size: int = Field(256, ge=1)
    timeout_seconds: float = Field(10.0, gt=0, description="per HTTP request")
    backoff_seconds: float = Field(2.0, gt=0, description="first retry delay, then doubled")
    max_backoff_seconds: float = Field(120.0, gt=0)
    give_up_after_seconds: float = Field(
        3600.0, gt=0, description="a message waits this long for its channel to come back"
    )
    dedup_seconds: float = Field(600.0, ge=0, description="same kind, reason and onset: once")
    rate_limit_per_minute: float = Field(
        12.0, gt=0, description="non-critical messages; critical ones are never limited"
    )
    rate_limit_burst: int = Field(10, ge=1)
    drain_seconds: float = Field(20.0, ge=0, description="at the end, wait for the queue")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    live: LiveConfig = Field(default_factory=LiveConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    faults: list[str] = Field(
        default_factory=list,
        description="injected faults, KIND@STEP[:key=value,...] (yoto train --inject)",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="merged last into the generated DeepSpeed config (expert escape hatch)",
    )

    @model_validator(mode="after")
    def _seq_warmup(self) -> Config:
        warm, seq_len = self.train.seq_warmup, self.model.seq_len
        if warm.start is not None and warm.start > seq_len:
            raise ValueError(
                f"train.seq_warmup.start={warm.start} must not exceed model.seq_len={seq_len}"
            )
        if warm.start is not None and warm.tokens <= 0:
            raise ValueError(
                "train.seq_warmup.tokens must be > 0 when train.seq_warmup.start is set "
                "(the training tokens over which the context reaches model.seq_len)"
            )
        if self.policy.rollback.rewarm and warm.start is None:
            raise ValueError(
                "policy.rollback.rewarm re-runs train.seq_warmup's ramp after a rollback: "
                "set train.seq_warmup.start and .tokens, or rewarm=false"
            )
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if data["model"]["attention"].get("prefix_loss") is None:  # the removed option
            del data["model"]["attention"]["prefix_loss"]
        return yaml.safe_dump(redact(data), sort_keys=False)


# --- loading ------------------------------------------------------------------------------


def _presets_dir():
    return resources.files("yoto").joinpath("presets")


def preset_names() -> list[str]:
    files = _presets_dir().iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        hint = _did_you_mean(name, names)
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(names)}")
    text = _presets_dir().joinpath(f"{name}.yaml").read_text()
    return _yaml_mapping(text, f"preset {name!r}")


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Resolve defaults < base < preset < file < overrides into a validated Config."""
    raw: dict[str, Any] = dict(base or {})
    if preset is not None:
        raw = deep_merge(raw, load_preset(preset))
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = deep_merge(raw, _yaml_mapping(path.read_text(), f"config file {str(path)!r}"))
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to the raw config dict."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(
            f"--set {item!r}: expected section.key=value, e.g. train.steps=100 or "
            f"data.paths=[corpus/,more.jsonl]"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_mapping(text: str, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of sections, got {type(data).__name__}")
    return data


# --- error messages -----------------------------------------------------------------------


def describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            lines.append("  " + _unknown_field(loc))
            continue
        if err["type"] == "value_error":
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        got = err.get("input")
        allowed = _allowed(loc)
        line = f"  {path}: {err['msg']} (got {got!r})"
        if allowed and allowed not in err["msg"]:
            line += f"; allowed: {allowed}"
        lines.append(line)
    return "\n".join(lines)


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _unknown_field(loc: list[str]) -> str:
    parent, name = loc[:-1], loc[-1]
    model = _model_at(parent)
    where = ".".join(parent) or "the top level"
    if model is None:
        return f"unknown field {'.'.join(loc)!r}"
    fields = list(model.model_fields)
    hint = _did_you_mean(name, fields)
    return f"unknown field {'.'.join(loc)!r}{hint}; fields of {where}: {', '.join(fields)}"


def _allowed(loc: list[str]) -> str:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model else None
    if field is None:
        return ""
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sign} {getattr(meta, attr)}")
    return " and ".join(parts)


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- secrets ------------------------------------------------------------------------------

_SECRET_KEY = re.compile(
    r"(^|_)(token|secret|password|passwd|api_?key|webhook|webhook_url|credentials?)($|_)", re.I
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
REDACTED = "<redacted>"


def redact(value: Any, key: str = "") -> Any:
    """Copy of a config tree with secrets replaced: values under secret-looking keys, and
    user:password@ parts of URLs. Saved configs and logs only ever see the redacted copy."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if _SECRET_KEY.search(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", value)
    return value
