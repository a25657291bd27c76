"""Evaluation: offline model zoo, datasets, perplexity and accuracy."""
