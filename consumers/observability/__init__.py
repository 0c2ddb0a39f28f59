"""What the daemon tells: Prometheus metrics, live model quality, summaries, HTTP endpoints."""
