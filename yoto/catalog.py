"""The metric catalog: every metric yoto emits is named here once.

The Prometheus exporter, the run directory's Parquet columns, the Grafana panels, the alert
rules and the explorer's charts all take their names from this table; a metric name typed
anywhere else is a bug. Code refers to a metric by its constant (``catalog.TRAIN_LOSS``),
never by the string.

Naming follows Prometheus: prefix ``yoto_``, base units in the name (``_seconds``,
``_tokens``), ``_total`` for counters, ``_ratio`` for 0-1 fractions, and labels whose values
are bounded (layer, source, rank; never step or run id, except on the ``yoto_run_info``
metric whose only job is to name the run).

A *series key* names one labelled series the way PromQL writes it: ``yoto_val_loss`` or
``yoto_val_loss{source="code"}``. It is the column name in the run directory's wide metric
table, so a value can be followed by one name from where it is born to where it is drawn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MetricType = Literal["gauge", "counter"]
Cadence = Literal["step", "eval", "probe", "event"]

_NAME = re.compile(r"^yoto_[a-z][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    type: MetricType
    unit: str  # base unit ("seconds", "tokens", "nats", "ratio") or "" when dimensionless
    help: str
    labels: tuple[str, ...] = ()
    cadence: Cadence = "step"
    group: str = ""  # the section of the catalog (and of the README's metric reference)

    def key(self, **labels: str) -> str:
        """The series key of this metric with the given label values."""
        return series_key(self.name, labels)


CATALOG: dict[str, Metric] = {}
GROUPS: dict[str, str] = {}  # section title -> the modules that emit its metrics
_group = ""


def _section(title: str, where: str) -> None:
    """The metrics defined next belong to section ``title``, emitted by ``where``."""
    global _group
    GROUPS[title] = where
    _group = title


# The Prometheus scrape job of the trainers' rank-0 /metrics: Prometheus adds it to every
# series as the ``job`` label, the dashboards' and alert rules' queries select on it, and
# the scrape configs under deploy/ name their job so (a test holds them to this name).
SCRAPE_JOB = "yoto"


def _metric(
    name: str,
    type: MetricType,
    unit: str,
    help: str,
    labels: tuple[str, ...] = (),
    cadence: Cadence = "step",
) -> Metric:
    if name in CATALOG:
        raise ValueError(f"metric {name!r} is defined twice in the catalog")
    metric = Metric(name, type, unit, help, labels, cadence, _group)
    CATALOG[name] = metric
    return metric


_section("training loop", "trainer/loop.py")
TRAIN_LOSS = _metric(
    "yoto_train_loss",
    "gauge",
    "nats",
    "Mean cross-entropy of the last optimizer step over the global batch (shorter contexts "
    "predict worse: during a sequence warmup read it beside yoto_seq_len).",
)
Z_LOSS = _metric(
    "yoto_z_loss",
    "gauge",
    "nats",
    "z-loss the last step added to the cross-entropy it back-propagated: model.z_loss x "
    "mean(log^2 Z), log Z the LM head's log-partition, over the global batch (z_loss > 0 only).",
)
GRAD_NORM = _metric(
    "yoto_grad_norm",
    "gauge",
    "",
    "Global L2 norm of the gradient before clipping, unscaled.",
)
LEARNING_RATE = _metric(
    "yoto_learning_rate",
    "gauge",
    "",
    "Learning rate used by the last optimizer step.",
)
STEPS = _metric(
    "yoto_steps_total",
    "counter",
    "",
    "Optimizer steps taken on the surviving branch of the run.",
)
TOKENS = _metric(
    "yoto_tokens_total",
    "counter",
    "tokens",
    "Training tokens consumed on the surviving branch of the run.",
)
BATCH_SIZE_TOKENS = _metric(
    "yoto_batch_size_tokens",
    "gauge",
    "tokens",
    "Global batch of the last step in tokens, as the DeepSpeed engine used it.",
)
SAMPLER_POSITION = _metric(
    "yoto_sampler_position",
    "gauge",
    "",
    "Training sequences drawn from the data stream before the last step: sequence k of "
    "the run is a pure function of (seed, k), so step S trained sequences [position, "
    "position + batch) (yoto data batch RUN_DIR --step S). A rollback's skip is a jump.",
)
SEQ_LEN = _metric(
    "yoto_seq_len",
    "gauge",
    "tokens",
    "Context length of the last step's training sequences: model.seq_len, or less during "
    "a sequence-length warmup (train.seq_warmup; again after a rewarming rollback).",
)
STEP_DURATION = _metric(
    "yoto_step_duration_seconds",
    "gauge",
    "seconds",
    "Wall-clock time of the last optimizer step, including its host transfer.",
)
THROUGHPUT = _metric(
    "yoto_throughput_tokens_per_second",
    "gauge",
    "tokens_per_second",
    "Training tokens per second of the last step, over all ranks (at the step's context "
    "length, yoto_seq_len).",
)
MFU = _metric(
    "yoto_mfu_ratio",
    "gauge",
    "ratio",
    "Model FLOPs utilisation of the last step: model FLOP/s over the devices' dense peak "
    "(trainer/flops.py has the count, at the step's context length); absent where no peak "
    "is known (CPU).",
)
SOURCE_TOKENS = _metric(
    "yoto_source_tokens_total",
    "counter",
    "tokens",
    "Training tokens consumed from one data source on the surviving branch.",
    labels=("source",),
)
ATTEMPT = _metric(
    "yoto_attempt",
    "gauge",
    "",
    "0 for the first branch of the run, +1 after each rollback or replaying resume.",
)
VAL_LOSS = _metric(
    "yoto_val_loss",
    "gauge",
    "nats",
    "Mean cross-entropy on the held-out split of one data source.",
    labels=("source",),
    cadence="eval",
)

EVAL_SCORE = _metric(
    "yoto_eval_score",
    "gauge",
    "",
    "Few-shot score of the newest evaluated checkpoint (lm-eval, eval.harness), per task "
    "and metric (acc, acc_norm: higher is better; perplexity: lower).",
    labels=("task", "metric"),
    cadence="eval",
)
EVAL_SKIPPED = _metric(
    "yoto_eval_skipped_total",
    "counter",
    "",
    "Checkpoints not evaluated because the previous evaluation was still running.",
    cadence="eval",
)

_section("spikes", "probes/spikes.py")
LOSS_SPIKES = _metric(
    "yoto_loss_spikes_total",
    "counter",
    "",
    "Loss spike episodes seen by the detectors (any rule; a non-finite loss counts).",
)
GRAD_NORM_SPIKES = _metric(
    "yoto_grad_norm_spikes_total",
    "counter",
    "",
    "Grad-norm spike episodes seen by the detectors.",
)
SPIKE_SCORE = _metric(
    "yoto_spike_score_ratio",
    "gauge",
    "ratio",
    "Fraction of the recent steps (probes.spikes.score_window) in a loss or grad-norm spike.",
)

_section("gradient noise scale", "probes/grad_noise.py")
GRADIENT_NOISE_SCALE = _metric(
    "yoto_gradient_noise_scale_samples",
    "gauge",
    "samples",
    "B_simple = tr(Sigma)/|G|^2 in sequences (x yoto_seq_len for tokens; during a sequence "
    "warmup a sequence holds fewer tokens, so the count in sequences moves); EMA-smoothed.",
)
GRADIENT_SQ_NORM_ESTIMATE = _metric(
    "yoto_gradient_noise_grad_sq",
    "gauge",
    "",
    "Unbiased two-batch estimate of the true gradient's squared norm |G|^2 (EMA).",
)
GRADIENT_TRACE_SIGMA = _metric(
    "yoto_gradient_noise_trace_sigma",
    "gauge",
    "",
    "Unbiased two-batch estimate of tr(Sigma), the per-sequence gradient variance (EMA).",
)

_section("precision", "probes/precision.py")
LOSS_SCALE = _metric("yoto_loss_scale", "gauge", "", "fp16 dynamic loss scale.")
LOSS_SCALE_HEADROOM = _metric(
    "yoto_loss_scale_headroom_log2",
    "gauge",
    "log2",
    "log2(loss scale / DeepSpeed's minimum scale): halvings left before the run stops.",
)
LOSS_SCALE_STEPS_SINCE_GROWTH = _metric(
    "yoto_loss_scale_steps_since_growth",
    "gauge",
    "steps",
    "Optimizer steps since the fp16 loss scale last grew.",
)
OVERFLOW_STEPS = _metric(
    "yoto_overflow_steps_total",
    "counter",
    "",
    "Steps with inf/nan gradients (skipped by fp16 loss scaling; bf16/fp32 applied them).",
)
CONSECUTIVE_OVERFLOWS = _metric(
    "yoto_consecutive_overflow_steps",
    "gauge",
    "steps",
    "Overflow steps in a row up to the last step (0 after a clean step).",
)
GRAD_UNDERFLOW = _metric(
    "yoto_grad_underflow_ratio",
    "gauge",
    "ratio",
    "Fraction of weight-gradient entries that are zero or subnormal in the gradient's dtype.",
    cadence="probe",
)
ACTIVATION_ABSMAX = _metric(
    "yoto_activation_absmax",
    "gauge",
    "",
    "Largest |activation| at a block's output.",
    labels=("layer",),
    cadence="probe",
)
ACTIVATION_HEADROOM = _metric(
    "yoto_activation_headroom_log2",
    "gauge",
    "log2",
    "log2(dtype max / activation absmax) at a block's output.",
    labels=("layer",),
    cadence="probe",
)

_section("per-layer statistics", "probes/layers.py")
LAYER_GRAD_NORM = _metric(
    "yoto_layer_grad_norm",
    "gauge",
    "",
    "L2 norm of one block's gradient (global batch, before clipping, unscaled).",
    labels=("layer",),
    cadence="probe",
)
LAYER_PARAM_NORM = _metric(
    "yoto_layer_param_norm",
    "gauge",
    "",
    "L2 norm of one block's parameters.",
    labels=("layer",),
    cadence="probe",
)
LAYER_UPDATE_RATIO = _metric(
    "yoto_layer_update_ratio",
    "gauge",
    "",
    "|parameter update| / |parameters| of one block in the last step.",
    labels=("layer",),
    cadence="probe",
)
ACTIVATION_RMS = _metric(
    "yoto_activation_rms",
    "gauge",
    "",
    "Root mean square of a block's output.",
    labels=("layer",),
    cadence="probe",
)
ATTENTION_LOGIT_MAX = _metric(
    "yoto_attention_logit_max",
    "gauge",
    "",
    "Largest pre-softmax attention logit in a block (sampled heads and query rows); over "
    "more keys as the context grows in a sequence warmup.",
    labels=("layer",),
    cadence="probe",
)
ATTENTION_ENTROPY = _metric(
    "yoto_attention_entropy_nats",
    "gauge",
    "nats",
    "Mean attention entropy in a block (sampled heads and query rows); at most log of the "
    "keys attended, so it rises with the context in a sequence warmup.",
    labels=("layer",),
    cadence="probe",
)
OUTPUT_LOG_Z = _metric(
    "yoto_output_logit_log_z",
    "gauge",
    "nats",
    "Mean log-partition log(sum exp(logits)) of the LM head (sampled rows).",
    cadence="probe",
)

_section("layer spectra", "probes/spectra.py")
WEIGHT_ALPHA = _metric(
    "yoto_weight_alpha",
    "gauge",
    "",
    "weightwatcher power-law exponent of a weight matrix's eigenvalue spectrum.",
    labels=("layer",),
    cadence="probe",
)
WEIGHT_ALPHA_WEIGHTED = _metric(
    "yoto_weight_alpha_weighted",
    "gauge",
    "",
    "weightwatcher alpha x log10(lambda_max).",
    labels=("layer",),
    cadence="probe",
)
WEIGHT_STABLE_RANK = _metric(
    "yoto_weight_stable_rank",
    "gauge",
    "",
    "Frobenius^2 / spectral^2 norm of a weight matrix.",
    labels=("layer",),
    cadence="probe",
)
WEIGHT_LOG_SPECTRAL_NORM = _metric(
    "yoto_weight_log_spectral_norm",
    "gauge",
    "",
    "log10 of the largest eigenvalue of W^T W.",
    labels=("layer",),
    cadence="probe",
)
WEIGHT_LOG_NORM = _metric(
    "yoto_weight_log_norm",
    "gauge",
    "",
    "log10 of the squared Frobenius norm of W.",
    labels=("layer",),
    cadence="probe",
)
SPECTRA_SKIPPED = _metric(
    "yoto_spectra_skipped_total",
    "counter",
    "",
    "Spectra analyses skipped because the previous one was still running.",
)

_section("per-rank and system health", "probes/system.py")
# Per-rank series come once per probes.system.every steps, from one all-gather; with more
# ranks than probes.system.rank_series_max only the slowest that many of each interval
# are recorded and exported (the straggler verdict still judges every rank).
RANK_STEP = _metric(
    "yoto_rank_step_seconds",
    "gauge",
    "seconds",
    "One rank's own time per step, mean over the last interval: batch fetch, host-to-"
    "device copy and forward passes, the parts no other rank is waited for (backward ends "
    "in the gradient reduction, where every rank waits for the slowest; at ZeRO-3 the "
    "forward's parameter gathers wait too). Device time of the forwards on CUDA.",
    labels=("rank",),
    cadence="probe",
)
RANK_DATA_WAIT = _metric(
    "yoto_rank_data_wait_seconds",
    "gauge",
    "seconds",
    "One rank's time per step getting its batch (sampler and host-to-device copy), mean "
    "over the last interval.",
    labels=("rank",),
    cadence="probe",
)
RANK_PEAK_MEMORY = _metric(
    "yoto_rank_peak_memory_bytes",
    "gauge",
    "bytes",
    "One rank's peak CUDA memory allocated by tensors since the run's start (CUDA only).",
    labels=("rank",),
    cadence="probe",
)
RANK_MEDIAN_STEP = _metric(
    "yoto_rank_median_step_seconds",
    "gauge",
    "seconds",
    "Median over all ranks of yoto_rank_step_seconds: what a straggler is compared with.",
    cadence="probe",
)
STRAGGLERS = _metric(
    "yoto_stragglers",
    "gauge",
    "",
    "Ranks slower than the median by more than probes.system.straggler_margin for "
    "probes.system.straggler_intervals intervals in a row, and still slow.",
    cadence="probe",
)
PROCESS_RSS = _metric(
    "yoto_process_resident_memory_bytes",
    "gauge",
    "bytes",
    "Resident set size of rank 0's training process (host memory).",
)
CUDA_ALLOCATED = _metric(
    "yoto_cuda_memory_allocated_bytes",
    "gauge",
    "bytes",
    "CUDA memory held by tensors on rank 0's device (torch caching allocator), after the step.",
)
CUDA_RESERVED = _metric(
    "yoto_cuda_memory_reserved_bytes",
    "gauge",
    "bytes",
    "CUDA memory reserved by rank 0's caching allocator (allocated plus cached free blocks).",
)
CUDA_PEAK = _metric(
    "yoto_cuda_memory_peak_bytes",
    "gauge",
    "bytes",
    "Peak CUDA memory held by tensors on rank 0's device since the run's start.",
)
CUDA_ALLOC_RETRIES = _metric(
    "yoto_cuda_alloc_retries_total",
    "counter",
    "",
    "cudaMalloc calls on rank 0 that failed and were retried after freeing the allocator's "
    "cache: memory is nearly full and steps slow down (torch.cuda.memory_stats).",
)
GPU_POWER = _metric(
    "yoto_gpu_power_watts",
    "gauge",
    "watts",
    "Power draw of rank 0's GPU (NVML, sampled in the background about once a second).",
)
GPU_TEMPERATURE = _metric(
    "yoto_gpu_temperature_celsius",
    "gauge",
    "celsius",
    "Core temperature of rank 0's GPU (NVML): a throttling GPU runs hot and clocks down.",
)
GPU_UTILIZATION = _metric(
    "yoto_gpu_utilization_ratio",
    "gauge",
    "ratio",
    "Fraction of the last NVML sample period in which a kernel ran on rank 0's GPU.",
)
GPU_SM_CLOCK = _metric(
    "yoto_gpu_sm_clock_hertz",
    "gauge",
    "hertz",
    "Streaming-multiprocessor clock of rank 0's GPU (NVML); below its usual value: "
    "thermal or power throttling.",
)

_section(
    "interventions",
    "trainer/loop.py, trainer/history.py, trainer/batch_control.py, trainer/episodes.py",
)
ROLLBACKS = _metric(
    "yoto_rollbacks_total",
    "counter",
    "",
    "Rollbacks to an earlier checkpoint (the run's attempt grows by one each).",
)
SKIPPED_STEPS = _metric(
    "yoto_skipped_steps_total",
    "counter",
    "",
    "Optimizer steps whose update skip-step did not apply (optim.skip_step: the loss or "
    "grad norm an outlier of the recent window, or not finite); their data was used.",
)
STEP_SKIPPED = _metric(
    "yoto_step_skipped",
    "gauge",
    "",
    "1 when this step's update was skipped by skip-step, else 0 (only with optim.skip_step on).",
)
SKIPPED_BATCHES = _metric(
    "yoto_skipped_batches_total",
    "counter",
    "",
    "Global batches of data skipped by rollbacks.",
)
BATCH_SIZE_CHANGES = _metric(
    "yoto_batch_size_changes_total",
    "counter",
    "",
    "Global batch changes by warmup, adaptive control or the policy.",
)
FAULTS_INJECTED = _metric(
    "yoto_faults_injected_total",
    "counter",
    "",
    "Faults injected on purpose (yoto train --inject), for tests and demos.",
)
HALTED = _metric(
    "yoto_halted",
    "gauge",
    "",
    "1 once the policy halted the run (rollback budget spent, or nothing to roll back to).",
)
EPISODES = _metric(
    "yoto_instability_episodes_total",
    "counter",
    "",
    "Instability episodes: runs of steps whose verdicts the policy acted on (skip_step or "
    "more), grouped until policy.episode.quiet_steps quiet steps or a rollback or halt.",
)
PAGED_EPISODES = _metric(
    "yoto_paged_episodes_total",
    "counter",
    "",
    "Episodes that paged: confirmed (verdicts on policy.episode.page_after steps, a "
    "critical one, an LR cooldown or batch change) or ended by a rollback or halt; one "
    "page each.",
)

_section("live path", "dashboards/live/exporter.py, alerts/notifier.py")
# Born in the exporter from what the trainer writes, so that a one-step event between two
# scrapes still reaches Prometheus: window maxima reset at each scrape, counters of events.
TRAIN_LOSS_WINDOW_MAX = _metric(
    "yoto_train_loss_window_max",
    "gauge",
    "nats",
    "Largest training loss since the previous scrape (a one-step spike is never missed).",
)
GRAD_NORM_WINDOW_MAX = _metric(
    "yoto_grad_norm_window_max",
    "gauge",
    "",
    "Largest global grad norm since the previous scrape.",
)
NONFINITE_LOSS_STEPS = _metric(
    "yoto_nonfinite_loss_steps_total",
    "counter",
    "",
    "Steps whose training loss was NaN or infinite.",
)
LAST_STEP_TIME = _metric(
    "yoto_last_step_timestamp_seconds",
    "gauge",
    "seconds",
    "Unix time at which the last optimizer step was recorded (a stalled run stops moving).",
)
EVENTS = _metric(
    "yoto_events_total",
    "counter",
    "",
    "Events written to the run's event log, by kind and severity.",
    labels=("kind", "severity"),
    cadence="event",
)
RUN_INFO = _metric(
    "yoto_run_info",
    "gauge",
    "",
    "Always 1; its labels name the run this process trains (join on instance).",
    labels=("run", "name", "preset"),
    cadence="event",
)
RUN_ENDED = _metric(
    "yoto_run_ended",
    "gauge",
    "",
    "1 once the run ended on purpose (finished, halted, interrupted): its target going "
    "down is then no alert. A crash leaves it 0, so that 'metrics absent' pages.",
    cadence="event",
)
ALERTS_SENT = _metric(
    "yoto_alerts_sent_total",
    "counter",
    "",
    "Chat notifications delivered by the in-process notifier.",
    labels=("channel",),
    cadence="event",
)
ALERTS_FAILED = _metric(
    "yoto_alerts_failed_total",
    "counter",
    "",
    "Chat delivery attempts that failed (each retry counts; with sent, the requests the "
    "endpoint saw).",
    labels=("channel",),
    cadence="event",
)
ALERTS_DROPPED = _metric(
    "yoto_alerts_dropped_total",
    "counter",
    "",
    "Notifications not sent: filtered before the queue (duplicate, rate_limited, "
    "queue_full), or not delivered to a channel (gave_up after retries, refused by the "
    "endpoint, undelivered when the run ended; these are kept for 'yoto alerts resend').",
    labels=("reason",),
    cadence="event",
)
LAYER_SERIES_DROPPED = _metric(
    "yoto_exporter_layer_series_dropped",
    "gauge",
    "",
    "Per-layer series not exported because of live.layer_series_max (the run directory "
    "keeps them all).",
    cadence="event",
)


_section("probe health", "probes/runner.py")
PROBE_FAILURES = _metric(
    "yoto_probe_failures_total",
    "counter",
    "",
    "Times a probe raised (its samples for that step were dropped).",
    labels=("probe",),
    cadence="event",
)


def series_key(name: str, labels: dict[str, str] | None = None) -> str:
    """``name`` or ``name{a="x",b="y"}`` with labels in sorted order."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


_KEY = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\{(?P<labels>.*)\})?$")
_PAIR = re.compile(r'([a-z_][a-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_series_key(key: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`series_key`."""
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"not a series key: {key!r}")
    labels = {k: _unescape(v) for k, v in _PAIR.findall(match.group("labels") or "")}
    return match.group("name"), labels


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def markdown() -> str:
    """The metric reference as Markdown tables, one per section (the README's, generated:
    ``python -m yoto.catalog --readme README.md`` rewrites it there)."""
    out = []
    for title, where in GROUPS.items():
        out += [f"**{title}** ({where})", "", "| metric | type | unit | labels | meaning |"]
        out.append("|---|---|---|---|---|")
        for m in CATALOG.values():
            if m.group == title:
                labels = ", ".join(m.labels)
                meaning = m.help.replace("|", "\\|")
                out.append(f"| `{m.name}` | {m.type} | {m.unit or '-'} | {labels} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


README_BEGIN = "<!-- metric reference: generated from yoto/catalog.py; do not edit -->"
README_END = "<!-- end of metric reference -->"


def with_readme_reference(text: str) -> str:
    """``text`` (the README) with its generated metric reference brought up to date."""
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise ValueError(f"the README has no {README_BEGIN!r} ... {README_END!r} block")
    return f"{head}{README_BEGIN}\n{markdown()}{README_END}{tail}"


def check_catalog() -> list[str]:
    """Problems with the catalog's names (empty when it follows the conventions)."""
    problems = []
    for metric in CATALOG.values():
        if not _NAME.match(metric.name):
            problems.append(f"{metric.name}: must match {_NAME.pattern}")
        if metric.type == "counter" and not metric.name.endswith("_total"):
            problems.append(f"{metric.name}: a counter's name must end in _total")
        if metric.type != "counter" and metric.name.endswith("_total"):
            problems.append(f"{metric.name}: only counters end in _total")
        if metric.unit == "ratio" and not metric.name.endswith("_ratio"):
            problems.append(f"{metric.name}: a 0-1 fraction's name must end in _ratio")
        if metric.unit in ("seconds", "bytes") and metric.unit not in metric.name:
            problems.append(f"{metric.name}: the base unit {metric.unit} must be in the name")
        for label in metric.labels:
            unbounded = label in ("step", "run", "run_id", "time")
            if not _LABEL.match(label) or (unbounded and not metric.name.endswith("_info")):
                problems.append(f"{metric.name}: label {label!r} is not a bounded label")
        if not metric.help.strip():
            problems.append(f"{metric.name}: help text is empty")
    return problems


if __name__ == "__main__":  # python -m yoto.catalog --readme README.md
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description="print or write the metric reference")
    ap.add_argument("--readme", type=Path, help="rewrite this README's generated block")
    args = ap.parse_args()
    if args.readme is None:
        print(markdown(), end="")
    else:
        args.readme.write_text(with_readme_reference(args.readme.read_text()))
