"""Serving: `python -m runtime.serve` (Ray Serve; the `serve` extra). The runtime core
never imports this package; jobs.py and api.py need no Ray (tests use them directly)."""
