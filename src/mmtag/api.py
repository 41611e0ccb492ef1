"""The Python API in one import: the `Tagger` (fit / predict / predict_proba / evaluate / save /
load) and the file-level jobs the CLI and the server call.

    from mmtag import Tagger
    tagger = Tagger.load("runs/fused")
    preds = tagger.predict(["a.jpg"], ["a man riding a horse"])
    preds[0].labels, preds[0].scores

Where each lives: the Tagger in `mmtag.model.tagger`, training in `mmtag.training.trainer`,
the jobs in `mmtag.jobs.*`, reading CSVs in `mmtag.data`.
"""
from __future__ import annotations

from .data import read_dataset  # noqa: F401
from .jobs.audit import audit  # noqa: F401
from .jobs.check import CheckReport, check  # noqa: F401
from .jobs.export import export  # noqa: F401
from .jobs.info import available_encoders, info  # noqa: F401
from .jobs.predict import evaluate, predict, write_submission  # noqa: F401
from .jobs.report import report  # noqa: F401
from .jobs.train import resume, train  # noqa: F401
from .model.tagger import DatasetPredictions, Prediction, Tagger  # noqa: F401
from .training.trainer import FitReport  # noqa: F401
