"""Evaluation: datasets as EditCase records and the paper's metrics."""
