"""Winnow: score every training sample with cheap proxy models, select the subset worth
training on, retrain on it. Pure core (data, models, scores, select, train) + Ray shell (distributed)."""

__version__ = "0.1.0"
