"""Live (Prometheus/Grafana) and post-mortem (Streamlit) views of a run; reads only the kernel."""
