"""Evaluation of dense and pruned models: zero-shot accuracy through lm-eval, speed, reports."""
from .zero_shot import REPORTED_METRIC, TASKS, evaluate_zero_shot, format_table

__all__ = ["REPORTED_METRIC", "TASKS", "evaluate_zero_shot", "format_table"]
