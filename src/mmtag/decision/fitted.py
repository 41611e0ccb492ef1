"""`Fitted`: the learned state of a model, complete. Training makes one (`mmtag.training`);
a loaded bundle is one (`Tagger.from_bundle`), which is why it lives before the training layer:
loading and predicting never import the code that trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..data import LabelSpace
from .metrics import Metrics
from .record import ValidationRecord
from .thresholds import Thresholds

if TYPE_CHECKING:  # the heads load torch; this class only holds one
    from ..heads import Head


@dataclass
class Fitted:
    """The learned state of a model, complete: a Tagger holds one of these or none."""

    label_space: LabelSpace
    head: Head
    dims: dict[str, int]
    thresholds: Thresholds
    val_metrics: Metrics | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: ValidationRecord | None = None
    extra: dict[str, object] = field(default_factory=dict)  # what strategies logged

    @property
    def finetune_history(self) -> dict[str, list[dict[str, float]]]:
        return self.extra.get("finetune") or {}  # type: ignore[return-value]
