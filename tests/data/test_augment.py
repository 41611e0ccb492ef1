"""Image (kornia) and caption (WordNet synonym) augmentation: changes, keeps labels, is seeded."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from mmtag.data import augment
from mmtag.data.augment import ImageAugment, TextAugment, label_words, parse_image_aug, parse_text_aug
from mmtag.data import COCO_NAMES
from mmtag.errors import MmtagError

S = 48
CAPTION = "A dog chases a cat across the big green field"


# WordNet is optional system data: tests marked `wordnet` skip, saying how to install it, where
# it is absent (tests/conftest.py).
needs_wordnet = pytest.mark.wordnet


def _ramps(b: int = 1, size: int = S) -> torch.Tensor:
    """(b, 3, size, size): channel 0 = x coordinate, 1 = y coordinate, both -1..1; 2 = x*y."""
    lin = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    img = torch.stack([xx, yy, xx * yy])
    return img.unsqueeze(0).repeat(b, 1, 1, 1).contiguous()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ------------------------------------------------------------------------------- images
def test_parse_image_aug_specs() -> None:
    assert parse_image_aug("") is None
    assert parse_image_aug("none") is None
    assert parse_image_aug(None) is None
    aug = parse_image_aug(" Crop , flip ")
    assert isinstance(aug, ImageAugment) and aug.ops == ("crop", "flip")
    assert parse_image_aug("flip").ops == ("flip",)
    with pytest.raises(MmtagError, match="blur"):
        parse_image_aug("crop,blur")
    with pytest.raises(MmtagError, match="twice"):
        parse_image_aug("flip,flip")
    with pytest.raises(MmtagError, match="empty"):
        parse_image_aug("crop,,flip")


def test_image_augment_changes_input_keeps_shape_and_is_seeded() -> None:
    aug = parse_image_aug("crop,flip")
    x = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = x.clone()
    out = aug(x, seed=7)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before)  # input untouched
    assert not torch.allclose(out, x)
    assert torch.equal(aug(x, seed=7), out)  # same seed → same output
    assert not torch.equal(aug(x, seed=8), out)
    # a torch.Generator seeds it just as well
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(aug(x, g1), aug(x, g2))
    # a single (3, S, S) image works too
    assert aug(x[0], seed=1).shape == (3, S, S)
    # values stay in the load_image range
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5


def test_image_augment_leaves_caller_rng_alone() -> None:
    aug = parse_image_aug("crop,flip")
    x = _ramps(2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    aug(x, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected)


def test_each_batch_item_gets_its_own_view() -> None:
    out = parse_image_aug("crop")(_ramps(8), seed=0)
    assert any(not torch.allclose(out[0], out[i]) for i in range(1, 8))


def test_crop_really_crops_within_scale_and_ratio() -> None:
    aug = parse_image_aug("crop")
    x = _ramps(16)
    out = aug(x, seed=11)
    assert out.shape == x.shape
    areas = []
    for img in out:
        # an affine crop of the coordinate ramps: the output spans a sub-window of [-1, 1]^2
        x0, x1 = float(img[0].min()), float(img[0].max())
        y0, y1 = float(img[1].min()), float(img[1].max())
        assert -1.0 - 1e-5 <= x0 < x1 <= 1.0 + 1e-5 and -1.0 - 1e-5 <= y0 < y1 <= 1.0 + 1e-5
        w, h = (x1 - x0) / 2, (y1 - y0) / 2
        areas.append(w * h)
        assert 0.6 * 0.85 <= w * h <= 1.0 + 1e-5  # scale (0.6, 1.0), pixel-grid slack
        assert 0.75 * 0.85 <= w / h <= (4 / 3) / 0.85  # ratio (3/4, 4/3)
        # rows stay rows: the x ramp is (nearly) constant down each column
        assert float((img[0] - img[0, :1]).abs().max()) < 1e-4
    assert min(areas) < 0.9  # some views really lose part of the frame
    # a distinct border is cut away by a crop that keeps < 90% of the area
    bordered = -torch.ones(1, 3, S, S)
    bordered[..., :4, :] = bordered[..., -4:, :] = 1.0
    bordered[..., :, :4] = bordered[..., :, -4:] = 1.0
    changed = [not torch.allclose(aug(bordered, seed=s), bordered) for s in range(10)]
    assert sum(changed) >= 8


def test_flip_really_mirrors() -> None:
    aug = parse_image_aug("flip")
    x = _ramps(1)  # left/right asymmetric
    mirror = x.flip(-1)
    assert not torch.equal(x, mirror)
    seen = {"same": 0, "mirror": 0}
    for seed in range(20):
        out = aug(x, seed=seed)
        if torch.equal(out, x):
            seen["same"] += 1
        elif torch.equal(out, mirror):
            seen["mirror"] += 1
        else:
            pytest.fail(f"flip-only output for seed {seed} is neither the input nor its mirror")
    assert seen["same"] > 0 and seen["mirror"] > 0


def test_image_augment_rejects_bad_input() -> None:
    aug = parse_image_aug("flip")
    with pytest.raises(MmtagError):
        aug(torch.zeros(3, S), seed=0)
    with pytest.raises(MmtagError):
        aug(np.zeros((1, 3, S, S), dtype=np.float32), seed=0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- captions
def test_label_words() -> None:
    words = label_words(COCO_NAMES.values())
    for w in ("person", "persons", "people", "man", "men", "woman", "women", "dog", "dogs", "cat",
              "cats", "bus", "buses", "bench", "benches", "traffic", "light", "lights",
              "hydrant", "hydrants", "airplane", "plane", "motorcycle", "bike", "bikes"):
        assert w in words, w
    assert label_words(["Fire Hydrant"], aliases=False) == {"fire", "fires", "hydrant", "hydrants"}


def test_parse_text_aug_specs() -> None:
    assert parse_text_aug("") is None
    assert parse_text_aug("none") is None
    with pytest.raises(MmtagError, match="backtranslate"):
        parse_text_aug("backtranslate:2")
    with pytest.raises(MmtagError, match="integer"):
        parse_text_aug("synonyms:x")
    with pytest.raises(MmtagError, match=">= 1"):
        parse_text_aug("synonyms:0")


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(augment.WORDNET_ENV, str(tmp_path))  # an empty directory
    with pytest.raises(MmtagError, match="wordnet-base") as info:
        parse_text_aug("synonyms:2")
    assert "MMTAG_WORDNET" in str(info.value)
    monkeypatch.delenv(augment.WORDNET_ENV)
    monkeypatch.setattr(augment, "WORDNET_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(MmtagError, match="apt-get install wordnet-base"):
        TextAugment(n=1)


@needs_wordnet
def test_wordnet_reader_reads_the_debian_layout() -> None:
    wn = augment.wordnet_reader()
    assert wn.get_version() == "3.0"
    names = {name for s in wn.synsets("car", "n") for name in s.lemma_names()}
    assert "automobile" in names
    assert wn.synset("dog.n.01").lexname() == "noun.animal"  # from the supplied lexnames


@needs_wordnet
def test_synonyms_change_caption_keep_class_words_and_are_seeded() -> None:
    aug = parse_text_aug("synonyms:2")
    assert isinstance(aug, TextAugment) and aug.n == 2
    outs = []
    for seed in range(40):
        out = aug(CAPTION, random.Random(seed))
        outs.append(out)
        assert out != CAPTION
        words = _words(out)
        assert words.count("dog") == 1 and words.count("cat") == 1, out
        # at most 2 words were replaced: the rest of the caption is intact
        kept = sum(1 for w in _words(CAPTION) if w in words)
        assert kept >= len(_words(CAPTION)) - 2, out
        assert aug(CAPTION, random.Random(seed)) == out  # same seed → same output
    assert len(set(outs)) > 5
    # numpy Generators work too, and are just as deterministic
    a = aug(CAPTION, np.random.default_rng(4))
    assert a == aug(CAPTION, np.random.default_rng(4)) and a != CAPTION


@needs_wordnet
def test_protected_words_are_never_replaced_nor_introduced() -> None:
    protected = label_words(COCO_NAMES.values())
    aug = parse_text_aug("synonyms:10", protected=protected)
    caption = "Two men and a woman ride horses near big trucks while dogs chase cats on a busy road"
    for seed in range(30):
        out = aug(caption, random.Random(seed))
        before, after = _words(caption), _words(out)
        for w in protected:
            assert before.count(w) == after.count(w), (w, out)
    # the synonym lists themselves never bring a class word in
    for word in ("chases", "field", "big", "road", "pursue", "vehicle"):
        for syn in aug.synonyms(word):
            assert not set(_words(syn)) & protected, (word, syn)
    assert aug.synonyms("dog") == () and aug.synonyms("Dogs") == ()
    # a caption of class words and function words is returned unchanged
    assert aug("A dog and a cat", random.Random(0)) == "A dog and a cat"
    # a custom protected set is honoured too
    only_field = parse_text_aug("synonyms:10", protected={"field"})
    for seed in range(10):
        assert "field" in _words(only_field(CAPTION, random.Random(seed)))


@needs_wordnet
def test_synonym_keeps_first_letter_case_and_spacing() -> None:
    aug = parse_text_aug("synonyms:10")
    caption = "Big field,  green car."
    outs = {aug(caption, random.Random(seed)) for seed in range(20)}
    assert any(not o.startswith("Big ") for o in outs)
    for out in outs:
        assert out[0].isupper(), out
        assert ",  " in out and out.endswith(" car."), out  # punctuation/spacing kept, car kept
        assert "_" not in out


@needs_wordnet
def test_text_augment_rejects_bad_rng_and_count() -> None:
    aug = parse_text_aug("synonyms")
    assert aug.n == 1
    assert aug(CAPTION, 3) == aug(CAPTION, random.Random(3))  # an int is a seed
    with pytest.raises(MmtagError):
        aug(CAPTION, "seed")  # type: ignore[arg-type]
    with pytest.raises(MmtagError):
        TextAugment(n=0)
