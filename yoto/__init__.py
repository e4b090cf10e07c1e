"""yoto: you only train once. A DeepSpeed GPT trainer that watches its own stability.

The ``yoto`` package is the small shared kernel (config, metric catalog, run store, events,
CLI); ``yoto.trainer``, ``yoto.probes``, ``yoto.dashboards`` and ``yoto.alerts`` are the
repository's top-level folders installed into this namespace.
"""

__version__ = "0.1.0"
