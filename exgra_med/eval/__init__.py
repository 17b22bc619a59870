"""Evaluation: VQA metrics with the reference definitions, and figures."""
