"""Named presets: the reference designs as plain YAML files shipped in `mmtag/presets/`.

A preset is a config mapping plus the substitutes to use for backbones whose weights are not on
this machine; every substitution is printed and recorded in the run's config (`substitutions`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import Config, read_yaml_mapping
from ..errors import MmtagError

log = logging.getLogger("mmtag")


@dataclass
class PresetInfo:
    name: str
    description: str
    path: Path


def preset_dir() -> Path:
    return Path(str(resources.files("mmtag") / "presets"))


def list_presets() -> list[PresetInfo]:
    out = []
    for path in sorted(preset_dir().glob("*.yaml")):
        raw = read_yaml_mapping(path, "preset file")
        out.append(PresetInfo(path.stem, str(raw.get("description", "")), path))
    return out


def _available(name: str, modality: str) -> bool:
    try:
        from ..encoders import encoder_entry  # torch: only when a preset is loaded

        return encoder_entry(name, modality).weights_present()
    except MmtagError:
        return False


def load_preset(name: str) -> Config:
    """The preset's Config, with unavailable backbones replaced by their listed substitutes.

    `name` is a shipped preset's name or the path of a preset file (a copied and edited one)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else preset_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.name for p in list_presets())
        raise MmtagError(f"unknown preset '{name}'; available: {known} (or a preset file path)")
    name = path.stem
    raw = read_yaml_mapping(path, "preset file")
    config = Config.from_dict(raw.get("config") or {}, source=str(path))
    substitutes: dict[str, str] = raw.get("substitutes") or {}
    notes: list[str] = []
    for field_name, modality in (("image_encoder", "image"), ("text_encoder", "text")):
        wanted = getattr(config.model, field_name)
        if modality in config.model.modalities and not _available(wanted, modality):
            instead = substitutes.get(wanted)
            if instead is None:
                raise MmtagError(f"preset '{name}': {modality} encoder '{wanted}' has no weights "
                                 "here and the preset names no substitute")
            setattr(config.model, field_name, instead)
            notes.append(f"{wanted} -> {instead}")
            log.warning("preset %s: %s encoder %s is not available here; using %s instead",
                        name, modality, wanted, instead)
    config.preset = name
    config.substitutions = notes
    return config
