"""Prometheus exporter and Grafana dashboards as code (see the live-observability issue)."""
