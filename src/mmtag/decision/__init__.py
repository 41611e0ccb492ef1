"""Decisions: thresholds tuned on validation scores, and the metrics they are judged by."""
from .metrics import Metrics, compute, confusion_counts, mean_and_std, pr_curve, samples_f1  # noqa: F401
from .thresholds import (FEW_VALIDATION_ROWS, GRID, TUNERS, Scores, Thresholds,  # noqa: F401
                         check_top_k, decide, f1_by_threshold, keep_top_k, report_part,
                         reporting, tune_decisions, tune_global)
from .record import ValidationRecord  # noqa: F401
