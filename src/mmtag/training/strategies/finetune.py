"""The fine-tune strategy (`--finetune image,text`): stage one of two-stage training replaces
encoders by copies fine-tuned on the task (see `mmtag.training.finetune`); the head is then
trained on the features of the fine-tuned encoders, which the cache keys apart from the
pretrained ones by their new encoder ids. Each modality's fine-tuning is a checkpointed stage
(`finetune-text`, `finetune-image`) that `mmtag train --resume` continues. With
`finetune.top_layers` (`--ft-top-layers N`) only the text encoder's top N layers are trained."""
from __future__ import annotations

from ...config import Config
from ...data import label_words, parse_image_aug, parse_text_aug
from ...errors import MmtagError
from ..finetune import finetune_image, finetune_text
from ..losses import create_loss
from .base import Strategy, TrainInputs, TrainState, register_strategy


@register_strategy("finetune")
class Finetune(Strategy):
    phase = "encoders"

    @classmethod
    def active(cls, config: Config, inputs: TrainInputs) -> bool:
        return bool(config.finetune.modalities)

    def run(self, state: TrainState) -> None:
        cfg = state.config
        tr, va = state.train_data, state.val_data
        y_tr = state.label_space.encode(tr.label_rows())
        y_va = state.label_space.encode(va.label_rows())
        history: dict[str, list[dict[str, float]]] = {}
        if cfg.finetune.top_layers and "text" not in cfg.finetune.modalities:
            raise MmtagError(f"--ft-top-layers {cfg.finetune.top_layers} chooses the text "
                             "encoder's trained layers, but only --finetune image was asked for: "
                             "add text (--finetune both), or drop --ft-top-layers")
        for modality in cfg.finetune.modalities:
            if modality not in state.featurizer.modalities:
                raise MmtagError(f"--finetune {modality}: this model does not use the {modality} modality")
            enc = state.featurizer.encoder(modality)
            loss = create_loss(cfg.train.loss, y_tr)
            if modality == "text":
                # Words naming any label class are never replaced (a "dog" must stay a dog).
                augment = parse_text_aug(cfg.augment.text,
                                         protected=label_words(state.label_space.names))
                res = finetune_text(enc, tr.captions, y_tr, va.captions, y_va,  # type: ignore[arg-type]
                                    cfg.finetune, loss=loss, seed=cfg.train.seed, augment=augment,
                                    progress=state.progress, run_log=state.run_log,
                                    metric=cfg.train.metric)
            else:
                # Datasets, not paths: a bad image is reported with its CSV row, as extraction does.
                res = finetune_image(enc, tr, y_tr, va, y_va, cfg.finetune,  # type: ignore[arg-type]
                                     loss=loss, seed=cfg.train.seed, workers=cfg.data.workers,
                                     augment=parse_image_aug(cfg.augment.image_spec(True)),
                                     progress=state.progress, run_log=state.run_log,
                                     metric=cfg.train.metric)
            state.featurizer.replace_encoder(modality, res.encoder)
            history[modality] = res.history
        state.log["finetune"] = history
