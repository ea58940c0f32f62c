"""Answers from a trained adapter: evaluation on held-out images, the metrics, asking."""
