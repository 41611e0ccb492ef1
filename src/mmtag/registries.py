"""Every registry of mmtag, and the built-in names each holds: the one source of the allowed values.

A registry maps names to implementations (head classes, loss factories, optimisers, training
strategies, decision rules). Its built-in entries are declared here *lazily*, as "module:attribute"
(as transformers' lazy modules do): the names are known without importing anything, so `--help`,
an argument error or a config check answers without loading torch, and the implementation's
module is imported the first time the entry is used. A plugin or a test adds an entry with
`register` (or the registry's own decorator, e.g. `heads.register_head`), and it is accepted at
once, with no list to edit. Adding a built-in is its module plus its line below.

The config (the bottom of the package: every other part reads it) checks a value against a
registry's names (`lister`), so config never imports the heads, losses or strategies it names
(they import config for their typed sections).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any


class Registry(MutableMapping[str, Any]):
    """Names → implementations, in declaration order; built-ins declared as "module:attribute"
    and imported when first looked up. `meta` keeps what is known of an entry without importing
    it (an encoder's modality)."""

    def __init__(self, what: str, lazy: dict[str, str] | None = None,
                 meta: dict[str, dict[str, Any]] | None = None) -> None:
        self.what = what
        self._entries: dict[str, Any] = {}
        self._lazy: set[str] = set()
        self.meta: dict[str, dict[str, Any]] = dict(meta or {})
        for name, target in (lazy or {}).items():
            module, colon, attribute = target.partition(":")
            if not module or (colon and not attribute):
                raise ValueError(f"a lazy {what} entry is 'module:attribute' or 'module', "
                                 f"got {target!r}")
            self._entries[name] = (module, attribute)
            self._lazy.add(name)

    def __getitem__(self, name: str) -> Any:
        value = self._entries[name]
        if name in self._lazy:
            module, attribute = value
            loaded = importlib.import_module(module)
            if not attribute:  # a module that registers the entry itself when imported
                if name in self._lazy:
                    raise LookupError(f"{module} did not register the {self.what} {name!r}")
                return self._entries[name]
            value = getattr(loaded, attribute)
            self._entries[name] = value
            self._lazy.discard(name)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        self._entries[name] = value
        self._lazy.discard(name)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._lazy.discard(name)
        self.meta.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:  # without importing the entry
        return name in self._entries

    def loaded(self, name: str) -> bool:
        """Whether `name` is registered and its implementation already imported."""
        return name in self._entries and name not in self._lazy

    def about(self, name: str, key: str) -> Any:
        """What is known of entry `name` without importing it: its loaded object's attribute
        `key`, else `meta[name][key]` (None when neither says)."""
        if self.loaded(name) and hasattr(self._entries[name], key):
            return getattr(self._entries[name], key)
        return self.meta.get(name, {}).get(key)

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """A decorator adding the decorated object as `name` (a plugin's head, loss, ...)."""
        def add(value: Any) -> Any:
            self[name] = value
            if meta:
                self.meta[name] = meta
            return value
        return add

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"


# The built-ins, in the order users see them (help texts, `mmtag ablate` variants).
HEADS = Registry("fusion head", {
    "image": "mmtag.heads.single:ImageHead",
    "text": "mmtag.heads.single:TextHead",
    "concat": "mmtag.heads.early:ConcatHead",
    "mean": "mmtag.heads.late:MeanHead",
    "union": "mmtag.heads.late:UnionHead",
    "gated": "mmtag.heads.late:GatedHead",
    "xattn": "mmtag.heads.cross_attention:CrossAttentionHead",
    "concat+mean": "mmtag.heads.averaged:ConcatMeanHead",
    "xattn+mean": "mmtag.heads.averaged:CrossAttentionMeanHead",
}, meta={  # the model options each head reads (`Head.params`), so a config is checked without torch
    name: {"params": ("hidden", "dropout") + extra} for name, extra in {
        "image": (), "text": (), "mean": (), "union": (), "gated": ("gate_hidden",),
        "concat": ("proj_dim", "image_input_dropout"),
        "concat+mean": ("proj_dim", "image_input_dropout"),
        "xattn": ("proj_dim", "image_input_dropout", "attention_heads"),
        "xattn+mean": ("proj_dim", "image_input_dropout", "attention_heads")}.items()})
LOSSES = Registry("loss", {
    "bce": "mmtag.training.losses:bce",
    "weighted-bce": "mmtag.training.losses:weighted_bce",
    "asl": "mmtag.training.losses:asl",
    "focal": "mmtag.training.losses:focal",
})
# `adam` adds the L2 penalty to the gradient, `adamw` decouples the weight decay
OPTIMIZERS = Registry("optimizer", {"adam": "torch.optim:Adam", "adamw": "torch.optim:AdamW"})
# in the order their phases run (see training.strategies.base)
STRATEGIES = Registry("training strategy", {
    "finetune": "mmtag.training.strategies.finetune:Finetune",
    "self-training": "mmtag.training.strategies.self_training:SelfTraining",
    "standard": "mmtag.training.strategies.standard:Standard",
    "unpaired-text": "mmtag.training.strategies.unpaired_text:UnpairedText",
})
TUNERS = Registry("threshold mode", {  # the decision rules (`--decision`)
    "global": "mmtag.decision.thresholds:tune_global",
    "per-class": "mmtag.decision.thresholds:tune_per_class",
    "balanced": "mmtag.decision.thresholds:tune_balanced",
    "gfm": "mmtag.decision.thresholds:expected_f1_rule",
    "auto": "mmtag.decision.thresholds:tune_auto",
})
# The figure every choice optimises (`--metric`: the decision's thresholds, `auto`'s pick, the best
# epoch, ablate's and sweep's ranking): name → score(y_true, y_pred) -> float, scikit-learn's F1
# with that `average` (zero_division=0). The decision rules compute these three exactly from
# counts (`decision.thresholds`), and `Metrics` has a figure of each (`<name>_f1`).
METRICS = Registry("metric", {
    "samples": "mmtag.decision.metrics:samples_f1",
    "micro": "mmtag.decision.metrics:micro_f1",
    "macro": "mmtag.decision.metrics:macro_f1",
})

# Encoders and their open-ended families ("hf:PATH"): each is an `EncoderEntry` or
# `EncoderFamily` of its module (a plugin adds one with `encoders.register_encoder` or
# `register_prefix`); their modality (and a family's placeholder) is known here without
# importing them.
ENCODERS = Registry("encoder", {
    "efficientnet-lite0": "mmtag.encoders.efficientnet:LITE0",
    "efficientnet-lite1": "mmtag.encoders.efficientnet:LITE1",
    "efficientnet-lite2": "mmtag.encoders.efficientnet:LITE2",
    "minilm-l6": "mmtag.encoders.hf_text:MINILM",
    "mpnet-base": "mmtag.encoders.mpnet:MPNET",
}, meta={"efficientnet-lite0": {"modality": "image"}, "efficientnet-lite1": {"modality": "image"},
         "efficientnet-lite2": {"modality": "image"}, "minilm-l6": {"modality": "text"},
         "mpnet-base": {"modality": "text"}})
ENCODER_FAMILIES = Registry("encoder family", {
    "hf": "mmtag.encoders.hf_text:HF",
    "timm": "mmtag.encoders.timm:TIMM",
    "flip": "mmtag.encoders.combined:FLIP",
    "concat": "mmtag.encoders.combined:CONCAT",
    "onnx": "mmtag.encoders.onnx:ONNX",  # wraps an encoder of either modality (`mmtag export` writes it)
}, meta={"hf": {"modality": "text", "placeholder": "PATH_OR_NAME"},
         "timm": {"modality": "image", "placeholder": "NAME"},
         "flip": {"modality": "image", "placeholder": "IMAGE_ENCODER"},
         "concat": {"modality": "image", "placeholder": "A+B"},
         "onnx": {"modality": None, "placeholder": "NAME"}})

REGISTRIES: dict[str, Registry] = {r.what: r for r in (HEADS, LOSSES, OPTIMIZERS, STRATEGIES, TUNERS,
                                                       METRICS, ENCODERS, ENCODER_FAMILIES)}


def encoder_modality(name: str) -> str | None:
    """The modality of a registered encoder (None: not registered), without importing it."""
    return ENCODERS.about(name, "modality") if name in ENCODERS else None


def encoder_names(modality: str | None = None) -> list[str]:
    """The names an encoder option of `modality` (None: any) accepts: registered encoders, then
    open-ended families as PREFIX:WHAT (`timm:NAME`; not a wrapping family such as onnx:).
    Nothing is imported or built."""
    names = [n for n in ENCODERS if modality is None or encoder_modality(n) == modality]
    families = [(p, ENCODER_FAMILIES.about(p, "modality")) for p in ENCODER_FAMILIES]
    return names + [f"{p}:{ENCODER_FAMILIES.about(p, 'placeholder') or 'NAME'}" for p, m in families
                    if m is not None and (modality is None or m == modality)]


def registry(what: str) -> Registry:
    """The registry of `what` (a key of REGISTRIES)."""
    return REGISTRIES[what]


def names(what: str) -> list[str]:
    """The registered names of `what`, in registration order (nothing is imported)."""
    return list(REGISTRIES[what])


def lister(what: str) -> Callable[[], list[str]]:
    """`names(what)` as a function, read when called (a value checked, a help printed), so a
    name registered later is listed."""
    return lambda: names(what)
