"""mmtag.registries: names known without importing their implementations, and the same objects
the implementing modules register."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmtag import registries
from mmtag.registries import Registry


def test_names_are_known_without_importing_torch() -> None:
    code = ("import sys; from mmtag import registries as r; "
            "print(sum(len(r.names(w)) for w in r.REGISTRIES), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, torch_loaded = out.stdout.split()
    assert int(count) == sum(len(r) for r in registries.REGISTRIES.values()) and torch_loaded == "False"


def test_every_built_in_resolves_to_what_its_module_registers() -> None:
    import mmtag.decision.thresholds  # noqa: F401
    import mmtag.heads  # noqa: F401
    import mmtag.training.losses  # noqa: F401
    import mmtag.training.strategies as strategies

    import mmtag.encoders  # noqa: F401

    for reg in registries.REGISTRIES.values():
        for name in reg:
            assert reg[name] is not None, (reg.what, name)
    # an encoder's (and a family's) modality as declared is the one its module registers
    for reg in (registries.ENCODERS, registries.ENCODER_FAMILIES):
        for name in reg:
            assert reg[name].modality == reg.meta[name]["modality"], name
    assert [registries.ENCODER_FAMILIES[p].placeholder for p in registries.ENCODER_FAMILIES] == \
        [registries.ENCODER_FAMILIES.meta[p]["placeholder"] for p in registries.ENCODER_FAMILIES]
    # strategies also name themselves in their modules (a decorator, as a plugin would): the
    # same names, in the same order, as declared
    assert list(registries.HEADS) == list(mmtag.heads.HEADS)
    # the model options a head reads, as declared for config checks, are its class's
    for name in registries.HEADS:
        assert registries.HEADS.meta[name]["params"] == registries.HEADS[name].params, name
    assert [strategies.STRATEGIES[n].name for n in strategies.STRATEGIES] == list(registries.STRATEGIES)


def test_a_registry_imports_an_entry_only_when_it_is_used_and_takes_new_ones() -> None:
    reg = Registry("toy", {"dumps": "json:dumps", "gone": "mmtag_no_such_module:x"})
    assert list(reg) == ["dumps", "gone"] and "gone" in reg and len(reg) == 2
    import json

    assert reg["dumps"] is json.dumps
    with pytest.raises(ModuleNotFoundError):
        reg["gone"]  # only a lookup imports
    reg.register("mine")(len)
    assert reg["mine"] is len and list(reg)[-1] == "mine"
    del reg["mine"]
    assert "mine" not in reg
    with pytest.raises(ValueError, match="module:attribute"):
        Registry("toy", {"bad": "json:"})
    # a bare module registers the entry itself when imported; one that does not is named
    with pytest.raises(LookupError, match="json did not register the toy 'self'"):
        Registry("toy", {"self": "json"})["self"]
