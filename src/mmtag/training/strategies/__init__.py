"""Training strategies (see `base`): each built-in one is a module that registers itself."""
from . import finetune, self_training, standard, unpaired_text  # noqa: F401  (registration)
from .base import (PHASES, STRATEGIES, Strategy, TrainInputs, TrainState,  # noqa: F401
                   register_strategy)
from .planning import plan  # noqa: F401
from .self_training import PseudoRound, select_pseudo_labels  # noqa: F401
