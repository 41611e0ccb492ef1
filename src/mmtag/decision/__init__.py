"""Decisions: thresholds tuned on validation scores, and the metrics they are judged by."""
