"""One short script per DVC stage (run as `python -m stages.<name>` so a DVC experiment copy imports its own code)."""
