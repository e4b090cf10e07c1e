"""The default probe set, built from the ``probes:`` config section."""

from __future__ import annotations

from yoto.config import Config

from .grad_noise import GradNoiseProbe
from .layers import LayerStatsProbe
from .precision import OverflowDetector, PrecisionProbe
from .runner import ProbeRunner
from .spectra import SpectraProbe
from .spikes import SpikeDetector


def build_runner(cfg: Config) -> ProbeRunner:
    """Probes and detectors as configured; ``probes.enabled=false`` leaves only the
    runner (the loop's own metrics still pass through it)."""
    p = cfg.probes
    if not p.enabled:
        return ProbeRunner()
    fp16, zero = cfg.train.precision == "fp16", cfg.train.zero_stage
    probes = []
    if p.grad_noise.enabled:
        probes.append(GradNoiseProbe(p.grad_noise, fp16=fp16, zero_stage=zero))
    if p.precision.enabled:
        probes.append(PrecisionProbe(p.precision, cfg.train.precision))
    if p.layers.enabled:
        probes.append(LayerStatsProbe(p.layers, fp16=fp16, zero_stage=zero))
    if p.spectra.enabled:
        probes.append(SpectraProbe(p.spectra, zero_stage=zero))
    detectors = []
    if p.spikes.enabled:
        detectors.append(SpikeDetector(p.spikes))
    if p.precision.enabled:
        detectors.append(OverflowDetector())
    return ProbeRunner(probes, detectors, max_failures=p.max_failures)
