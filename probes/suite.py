"""The default probe set, built from the ``probes:`` config section."""

from __future__ import annotations

from pathlib import Path

from yoto.config import Config

from .grad_noise import GradNoiseProbe
from .layers import LayerStatsProbe
from .precision import OverflowDetector, PrecisionProbe
from .runner import ProbeRunner
from .spectra import SpectraProbe
from .spikes import SpikeDetector
from .system import RankHealthProbe, StragglerDetector, SystemHealthProbe


def build_runner(cfg: Config, checkpoints: str | Path | None = None) -> ProbeRunner:
    """Probes and detectors as configured; ``probes.enabled=false`` leaves only the
    runner (the loop's own metrics still pass through it). ``checkpoints``: the run's
    checkpoint folder, where the spectra probe reads its weights at ZeRO-3."""
    p = cfg.probes
    if not p.enabled:
        return ProbeRunner()
    fp16, zero = cfg.train.precision == "fp16", cfg.train.zero_stage
    probes = []
    if p.grad_noise.enabled:
        probes.append(GradNoiseProbe(p.grad_noise, fp16=fp16))
    if p.precision.enabled:
        probes.append(PrecisionProbe(p.precision, cfg.train.precision))
    if p.layers.enabled:
        probes.append(LayerStatsProbe(p.layers, fp16=fp16))
    if p.spectra.enabled:
        every = cfg.checkpoint.every
        probes.append(SpectraProbe(p.spectra, zero, checkpoints, checkpoint_every=every))
    detectors = []
    if p.spikes.enabled:
        detectors.append(SpikeDetector(p.spikes))
    if p.precision.enabled:
        detectors.append(OverflowDetector())
    if p.system.enabled:
        health = RankHealthProbe(p.system)
        probes += [health, SystemHealthProbe(p.system)]
        detectors.append(StragglerDetector(p.system, health))
    return ProbeRunner(probes, detectors, max_failures=p.max_failures)
