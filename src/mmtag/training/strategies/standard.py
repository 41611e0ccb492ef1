"""The standard strategy: a fresh head of the configured kind trained on the training rows'
features (and their cached augmented views, with `augment.views`)."""
from __future__ import annotations

from ...config import Config
from .base import Strategy, TrainInputs, TrainState, register_strategy


@register_strategy("standard")
class Standard(Strategy):
    phase = "head"

    @classmethod
    def active(cls, config: Config, inputs: TrainInputs) -> bool:
        return inputs.extra_text is None  # otherwise `unpaired-text` trains the head

    def run(self, state: TrainState) -> None:
        assert state.train is not None and state.y_train is not None
        state.result = state.fit(state.train, state.y_train, views=state.views)
