"""Stability probes: the Probe protocol, the runner that moves a step's values to the host
once, and (with the probes issue) spikes, gradient noise scale, precision, layer statistics
and spectra. Probes observe; only the policy acts."""
