"""The plumbing every stage shares: its entry point, params, paths, MLflow tracking, atomic writes and devices."""
