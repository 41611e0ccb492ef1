"""The unpaired-text strategy (`--extra-text`): labelled captions without images teach the text
branch as well.

A text-only head simply gets more rows. A late-fusion head is trained branch by branch: its text
MLP on paired + extra captions, its image MLP on paired rows, then whatever combines them (the
gate of `gated`) on paired rows with both branches frozen; validation (paired rows) picks each
stage's best epoch and the thresholds. Heads that need both modalities in every row refuse.
"""
from __future__ import annotations

import logging

import numpy as np

from ...config import Config
from ...data import Dataset
from ...errors import MmtagError
from ...features import Features
from ...heads import HEADS, LateFusionHead, takes_unpaired
from ..loop import FitResult, seed_everything
from .base import Strategy, TrainInputs, TrainState, register_strategy

log = logging.getLogger("mmtag")


@register_strategy("unpaired-text")
class UnpairedText(Strategy):
    phase = "head"

    @classmethod
    def active(cls, config: Config, inputs: TrainInputs) -> bool:
        return inputs.extra_text is not None

    def run(self, state: TrainState) -> None:
        extra = state.inputs.extra_text
        assert extra is not None and state.train is not None and state.y_train is not None
        extra = without_captions_of(extra, state.val_data)
        if not takes_unpaired(state.head_name):
            late = [n for n in HEADS if n != "text" and takes_unpaired(n)]
            raise MmtagError(f"--extra-text needs --modalities text or a late-fusion head "
                             f"({', '.join(sorted(late))}); '{state.head_name}' needs both "
                             "modalities per row")
        extra_feats = state.featurizer.text_features(extra, progress=state.progress)
        y_extra = state.label_space.encode(extra.label_rows())
        text_rows = Features({"text": np.concatenate([state.train["text"], extra_feats["text"]])})
        text_y = np.concatenate([state.y_train, y_extra])
        if state.head_name == "text":
            state.result = state.fit(text_rows, text_y)
            return
        seed_everything(state.config.train.seed)
        head = state.new_head()
        assert isinstance(head, LateFusionHead)
        for modality, rows, y in (("text", text_rows, text_y), ("image", state.train, state.y_train)):
            branch = state.fit(rows, y, head=state.new_head(modality), stage=f"branch-{modality}")
            getattr(head, modality).load_state_dict(branch.head.net.state_dict())  # type: ignore[union-attr]
            getattr(head, modality).requires_grad_(False)
        if any(p.requires_grad for p in head.parameters()):
            state.result = state.fit(state.train, state.y_train, head=head, stage="combine")
        else:
            head.eval()
            state.result = FitResult(head=head, history=branch.history, best_epoch=branch.best_epoch)


def without_captions_of(extra: Dataset, val: Dataset) -> Dataset:
    """Extra rows minus those whose caption is also a validation caption: corpora built from the
    same source (e.g. two COCO-derived sets) share items, and a validation caption seen with its
    labels in training would inflate validation scores."""
    seen = {c.strip().lower() for c in val.captions}
    keep = [i for i, c in enumerate(extra.captions) if c.strip().lower() not in seen]
    if len(keep) < len(extra):
        log.warning("--extra-text: dropped %d row(s) whose caption is also a validation caption",
                    len(extra) - len(keep))
    return extra.subset(keep) if len(keep) < len(extra) else extra
