"""Experiment loggers: metrics.jsonl and summary.json always, plus W&B, TensorBoard or CSV."""
