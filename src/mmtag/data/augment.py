"""Training-time augmentation for both modalities, built from short spec strings.

Images: `parse_image_aug("crop,flip")` gives an `ImageAugment` that applies kornia's
`RandomResizedCrop` (scale 0.6-1.0, aspect ratio 3/4-4/3, resized back to the input size) and
`RandomHorizontalFlip` to a batch `(B, 3, S, S)` — the layout `mmtag.data.load_image` produces,
stacked. kornia is a maintained augmentation library written on plain torch ops, so it works beside
the pinned CPU torch build (no torchvision needed). Every op only moves or mirrors pixels, so an
image keeps its labels; the crop keeps at least 60% of the area so a labelled object is rarely lost.

Captions: `parse_text_aug("synonyms:2")` gives a `TextAugment` that replaces up to 2 content words
(nouns, verbs, adjectives; no stopwords, no short words) with a WordNet synonym. WordNet 3.0 is read
with nltk's `WordNetCorpusReader` from the dict files of Debian's `wordnet-base` package
(`/usr/share/wordnet`), or from the directory named by `MMTAG_WORDNET`; no nltk download is used.
Words that name a label class (`protected`, see `label_words`) are never replaced, and no
replacement may bring a protected word in, so a caption keeps exactly the class words it had.

Both are deterministic given a seed and leave the caller's random state alone.
"""
from __future__ import annotations

import io
import os
import random
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .coco import COCO_NAMES
from ..errors import MmtagError

# ------------------------------------------------------------------------------- images
CROP_SCALE = (0.6, 1.0)  # fraction of the image area a random resized crop keeps
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # the crop's aspect-ratio range
IMAGE_OPS = ("crop", "flip")


def _kornia_augmentation() -> Any:
    try:
        import kornia.augmentation as K
    except ImportError as exc:  # pragma: no cover - kornia is a declared dependency
        raise MmtagError(f"image augmentation needs kornia ({exc}); install it with "
                         "'pip install kornia' (it works with the pinned CPU torch)") from None
    return K


class ImageAugment:
    """Random image augmentation of a batch `(B, 3, H, W)` (or one image `(3, H, W)`).

    `ops` is an ordered subset of `IMAGE_OPS`: "crop" = random resized crop back to (H, W),
    "flip" = horizontal flip with probability 1/2. Each image of a batch draws its own parameters.
    """

    def __init__(self, ops: Sequence[str], *, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> None:
        ops = tuple(ops)
        unknown = [op for op in ops if op not in IMAGE_OPS]
        if unknown:
            raise MmtagError(f"unknown image augmentation '{unknown[0]}'; "
                             f"available: {', '.join(IMAGE_OPS)}")
        if not ops:
            raise MmtagError("ImageAugment needs at least one op; use None for no augmentation")
        if len(set(ops)) != len(ops):
            raise MmtagError(f"image augmentation ops listed twice: {','.join(ops)}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise MmtagError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise MmtagError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
        self.ops = ops
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self._modules: dict[tuple[int, int], list[torch.nn.Module]] = {}

    @property
    def spec(self) -> str:
        return ",".join(self.ops)

    def __repr__(self) -> str:
        return f"ImageAugment({self.spec!r}, scale={self.scale}, ratio={self.ratio})"

    def _pipeline(self, h: int, w: int) -> list[torch.nn.Module]:
        mods = self._modules.get((h, w))
        if mods is None:
            K = _kornia_augmentation()
            mods = []
            for op in self.ops:
                if op == "crop":
                    mods.append(K.RandomResizedCrop(size=(h, w), scale=self.scale, ratio=self.ratio,
                                                    align_corners=False, p=1.0))
                else:  # "flip"
                    mods.append(K.RandomHorizontalFlip(p=0.5))
            self._modules[(h, w)] = mods
        return mods

    def __call__(self, x: torch.Tensor, seed: int | torch.Generator | None = None) -> torch.Tensor:
        """Augmented copy of `x` (same shape, dtype and device).

        `seed` (an int, or a torch.Generator one int is drawn from) makes the result
        deterministic; the global torch RNG is then seeded inside `torch.random.fork_rng()`, so
        the caller's RNG state is the same afterwards. With `seed=None` the global RNG is used
        (and advanced), like any torch random op.
        """
        import torch  # here, not at the top: `mmtag.data` loads without torch

        if not isinstance(x, torch.Tensor):
            raise MmtagError(f"ImageAugment expects a torch.Tensor, got {type(x).__name__}")
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            shape = tuple(x.shape[1:]) if single else tuple(x.shape)
            raise MmtagError(f"ImageAugment expects (B, 3, H, W) or (3, H, W), got {shape}")
        if not x.is_floating_point():
            raise MmtagError(f"ImageAugment expects a floating-point tensor, got {x.dtype}")
        mods = self._pipeline(int(x.shape[-2]), int(x.shape[-1]))

        def apply() -> torch.Tensor:
            out = x
            with torch.no_grad():
                for m in mods:
                    out = m(out)
            return out

        if seed is None:
            out = apply()
        else:
            if isinstance(seed, torch.Generator):
                seed = int(torch.randint(0, 2**62, (1,), generator=seed))
            devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()
                       ] if x.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(seed))
                out = apply()
        out = out.to(dtype=x.dtype)
        return out[0] if single else out


def parse_image_aug(spec: str | None, **kwargs: Any) -> ImageAugment | None:
    """'crop,flip' → ImageAugment (ops applied in the order given); '' / 'none' → None.

    Unknown or repeated ops raise MmtagError. `kwargs` go to ImageAugment (scale, ratio).
    """
    text = (spec or "").strip().lower()
    if text in ("", "none"):
        return None
    ops = [op.strip() for op in text.split(",")]
    if any(not op for op in ops):
        raise MmtagError(f"empty entry in image augmentation spec {spec!r}")
    return ImageAugment(ops, **kwargs)


# ----------------------------------------------------------------------------- captions
WORDNET_ENV = "MMTAG_WORDNET"
# Where WordNet 3.0 dict files are looked for when MMTAG_WORDNET is unset: Debian/Ubuntu's
# wordnet-base package, then the upstream Princeton install's default prefix.
WORDNET_DIRS: tuple[str, ...] = ("/usr/share/wordnet", "/usr/local/share/wordnet",
                                 "/usr/local/WordNet-3.0/dict", "/usr/share/wordnet/dict")
WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in
                      ("noun", "verb", "adj", "adv")) + ("noun.exc", "verb.exc", "adj.exc", "adv.exc")
INSTALL_HINT = ("install it with 'apt-get install wordnet-base' (Debian/Ubuntu), or set "
                f"{WORDNET_ENV} to a WordNet 3.0 dict directory (the one holding index.noun, "
                "data.noun, ...)")

# WordNet 3.0's `lexnames` file (lexicographer file number, name, syntactic category). Debian's
# wordnet-base does not ship it but nltk's reader needs it; it is fixed for WordNet 3.0.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAMES_TEXT = "".join(f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
                        for i, name in enumerate(_LEXNAMES))

# English function words (nltk's stopword list, which would otherwise need a download).
STOPWORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because been
before being below between both but by can couldn couldn't d did didn didn't do does doesn
doesn't doing don don't down during each few for from further had hadn hadn't has hasn hasn't
have haven haven't having he he'd he'll he's her here hers herself him himself his how i i'd
i'll i'm i've if in into is isn isn't it it'd it'll it's its itself just ll m ma me mightn
mightn't more most mustn mustn't my myself needn needn't no nor not now o of off on once only or
other our ours ourselves out over own re s same shan shan't she she'd she'll she's should
should've shouldn shouldn't so some such t than that that'll the their theirs them themselves
then there these they they'd they'll they're they've this those through to too under until up
ve very was wasn wasn't we we'd we'll we're we've were weren weren't what when where which while
who whom why will with won won't wouldn wouldn't y you you'd you'll you're you've your yours
yourself yourselves
one two three four five six seven eight nine ten several many much also another next near
across along alongside around behind beside besides beyond inside outside toward towards onto
upon within without among amongst past via like unlike
get gets got getting go goes going went gone make makes made
""".split())
MIN_WORD_LEN = 3  # words shorter than this are never replaced
SENSES = 2  # synonyms come from the word's first (most frequent) senses of its dominant POS

# Other words captions use for the COCO classes; `label_words` protects them too.
CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "person": ("people", "persons", "man", "men", "woman", "women", "boy", "girl", "child",
               "children", "kid", "guy", "lady", "ladies", "gentleman", "gentlemen", "player",
               "skier", "surfer", "skateboarder", "rider", "human", "adult", "baby", "babies",
               "someone", "somebody", "crowd"),
    "bicycle": ("bike", "cycle"),
    "car": ("auto", "automobile", "vehicle", "taxi", "cab"),
    "motorcycle": ("motorbike", "bike", "scooter", "moped"),
    "airplane": ("plane", "aeroplane", "aircraft", "jet", "airliner"),
    "bus": ("buses", "busses", "coach"),
    "train": ("locomotive", "railway", "railroad", "tram"),
    "truck": ("lorry", "pickup", "van"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht", "ferry"),
    "traffic light": ("stoplight", "signal"),
    "fire hydrant": ("hydrant",),
    "stop sign": ("sign",),
    "parking meter": ("meter",),
    "bench": ("seat",),
    "bird": ("seagull", "gull", "pigeon", "duck", "goose", "geese"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "puppies", "pup"),
    "horse": ("pony", "ponies", "foal"),
}

_WORD_RE = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)?")
_LEMMA_RE = re.compile(r"[a-z]+(?:[ -][a-z]+)*")


_IRREGULAR_S = {"be": "is", "have": "has", "go": "goes", "do": "does", "undergo": "undergoes",
                "man": "men", "woman": "women", "child": "children", "person": "people",
                "foot": "feet", "tooth": "teeth", "mouse": "mice", "goose": "geese"}


def plural(word: str) -> str:
    """Simple English plural / third-person -s: bus→buses, bench→benches, city→cities, dog→dogs
    (and a few irregular ones: man→men, person→people, go→goes)."""
    if word in _IRREGULAR_S:
        return _IRREGULAR_S[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def label_words(names: Iterable[str], *, aliases: bool = True) -> set[str]:
    """The words that name the given classes in a caption, lowercased: each name's words and their
    simple plurals ('traffic light' → traffic, traffics, light, lights), plus, with `aliases`, the
    `CLASS_ALIASES` of known classes (person → people, man, men, woman, ...) and their plurals."""
    out: set[str] = set()
    for name in names:
        key = " ".join(str(name).lower().split())
        words = re.findall(r"[a-z]+", key)
        if aliases:
            words += [w for alias in CLASS_ALIASES.get(key, ()) for w in re.findall(r"[a-z]+", alias)]
        for w in words:
            out.add(w)
            out.add(plural(w))
    return out


def _default_protected() -> frozenset[str]:
    return frozenset(label_words(COCO_NAMES.values()))


def find_wordnet(root: str | Path | None = None) -> Path:
    """The WordNet 3.0 dict directory to use: `root`, else $MMTAG_WORDNET, else the first of
    `WORDNET_DIRS` that holds the dict files. Raises MmtagError naming how to install it."""
    explicit = root if root is not None else os.environ.get(WORDNET_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        missing = [f for f in WORDNET_FILES if not (path / f).is_file()]
        if missing:
            source = "given" if root is not None else f"{WORDNET_ENV}"
            raise MmtagError(f"WordNet directory {path} ({source}) lacks {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}; caption synonym augmentation "
                             f"needs WordNet 3.0: {INSTALL_HINT}")
        return path.resolve()
    for cand in WORDNET_DIRS:
        path = Path(cand)
        if all((path / f).is_file() for f in WORDNET_FILES):
            return path.resolve()
    raise MmtagError("WordNet not found (looked in "
                     f"{', '.join(WORDNET_DIRS)}); caption synonym augmentation needs WordNet 3.0: "
                     f"{INSTALL_HINT}")


_READERS: dict[Path, Any] = {}
_READERS_LOCK = threading.Lock()


def wordnet_reader(root: str | Path | None = None) -> Any:
    """nltk's WordNetCorpusReader on the dict files at `find_wordnet(root)` (cached per directory).

    Debian's layout lacks `lexnames`, which is supplied from `LEXNAMES_TEXT`. The directory is
    appended to `nltk.data.path`, because nltk (3.9+) only opens corpus files under its data
    roots. The cross-version mapping nltk builds for multilingual WordNet is skipped: it would
    need nltk's own downloaded copy of WordNet, and only the English lemmas are used here.
    """
    path = find_wordnet(root)
    with _READERS_LOCK:
        reader = _READERS.get(path)
        if reader is None:
            reader = _READERS[path] = _build_reader(path)
    return reader


def _build_reader(path: Path) -> Any:
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as exc:  # pragma: no cover - nltk is a declared dependency
        raise MmtagError(f"caption synonym augmentation needs nltk ({exc}); "
                         "install it with 'pip install nltk'") from None

    has_lexnames = (path / "lexnames").is_file()

    class _Reader(WordNetCorpusReader):
        def open(self, file: str) -> Any:  # noqa: A003 - nltk's method name
            if file == "lexnames" and not has_lexnames:
                return io.StringIO(LEXNAMES_TEXT)
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    if str(path) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(path))
    try:
        with warnings.catch_warnings():
            # "The multilingual functions are not available with this Wordnet version"
            warnings.simplefilter("ignore", UserWarning)
            return _Reader(str(path), None)
    except (OSError, ValueError, LookupError, AssertionError, UnicodeDecodeError) as exc:
        raise MmtagError(f"cannot read WordNet at {path} ({exc.__class__.__name__}: {exc}); "
                         f"caption synonym augmentation needs WordNet 3.0: {INSTALL_HINT}") from None


Rng = random.Random | np.random.Generator


def _as_rng(rng: Rng | int) -> Rng:
    if isinstance(rng, (random.Random, np.random.Generator)):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    raise MmtagError("TextAugment needs a random.Random, a numpy Generator or an int seed, got "
                     f"{type(rng).__name__}")


def _randbelow(rng: Rng, n: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def _permutation(rng: Rng, n: int) -> list[int]:
    if isinstance(rng, np.random.Generator):
        return [int(i) for i in rng.permutation(n)]
    return rng.sample(range(n), n)


def _match_case(replacement: str, original: str) -> str:
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


@dataclass
class TextAugment:
    """Replace up to `n` content words of a caption with a random WordNet synonym.

    Candidates are words of at least `MIN_WORD_LEN` letters that are not stopwords, not in
    `protected`, and are nouns, verbs or adjectives in WordNet (a plural or third-person -s form
    is re-inflected on its synonym). Synonyms are the other lemmas of the word's first `SENSES`
    senses in its most frequent part of speech; proper nouns and any lemma containing a protected
    word are left out. `protected` defaults to `label_words` of `mmtag.coco.COCO_NAMES`.
    """

    n: int = 1
    protected: frozenset[str] = field(default_factory=_default_protected)
    wordnet: str | Path | None = None  # dict directory; None = $MMTAG_WORDNET or WORDNET_DIRS
    _root: Path = field(init=False, repr=False)
    _cache: dict[str, tuple[str, ...]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise MmtagError(f"synonym replacement count must be an integer >= 1, got {self.n!r}")
        self.n = int(self.n)
        self.protected = frozenset(w.lower() for w in self.protected)
        self._root = find_wordnet(self.wordnet)
        wordnet_reader(self._root)  # fail now, not at the first caption

    @property
    def spec(self) -> str:
        return f"synonyms:{self.n}"

    def __call__(self, caption: str, rng: Rng | int) -> str:
        """`caption` with up to `n` words replaced (unchanged if it has no candidate word)."""
        rng = _as_rng(rng)
        matches = [m for m in _WORD_RE.finditer(caption) if self.synonyms(m.group())]
        if not matches:
            return caption
        chosen = sorted(_permutation(rng, len(matches))[: self.n])
        parts: list[str] = []
        last = 0
        for k in chosen:
            m = matches[k]
            options = self.synonyms(m.group())
            parts += [caption[last:m.start()], _match_case(options[_randbelow(rng, len(options))],
                                                           m.group())]
            last = m.end()
        parts.append(caption[last:])
        return "".join(parts)

    def synonyms(self, word: str) -> tuple[str, ...]:
        """The replacements `word` may get (empty when it is not a candidate), in WordNet order."""
        key = word.lower()
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._lookup(key)
        return cached

    def _lookup(self, word: str) -> tuple[str, ...]:
        if (len(word) < MIN_WORD_LEN or word in STOPWORDS or word in self.protected
                or not word.isalpha() or not word.isascii()):
            return ()
        wn = wordnet_reader(self._root)
        counted = (self._root / "cntlist.rev").is_file()  # sense frequencies; optional
        best: tuple[int, int, str, str, list[Any]] | None = None  # (-count, order, pos, base, senses)
        for order, pos in enumerate("nva"):
            base = wn.morphy(word, pos)
            if base is None or base in self.protected:
                continue
            senses = [s for s in wn.synsets(base, pos) if base in
                      (name.lower() for name in s.lemma_names())]
            if not senses:
                continue
            count = sum(lemma.count() for s in senses for lemma in s.lemmas()
                        if lemma.name().lower() == base) if counted else 0
            # An -ed/-ing/irregular form (riding, parked, men) or a comparative (bigger) cannot be
            # re-inflected on a synonym; if that reading is the most frequent one, the word is
            # left alone rather than replaced by a synonym of a less likely reading.
            blocked = base != word and (word != plural(base) or pos == "a")
            cand = (-count, order, pos, base, None if blocked else senses)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None or best[4] is None:
            return ()
        _, _, pos, base, senses = best
        inflect = base != word
        out: list[str] = []
        for s in senses[:SENSES]:
            for name in s.lemma_names():
                phrase = name.replace("_", " ")
                if phrase.lower() == base or not _LEMMA_RE.fullmatch(phrase):
                    continue  # the word itself, proper nouns, digits or odd punctuation
                tokens = re.findall(r"[a-z]+", phrase)
                if any(t in self.protected or plural(t) in self.protected for t in tokens):
                    continue
                if inflect:
                    # a noun's plural goes on its head (last word), a verb's -s on its first word
                    words = phrase.split(" ")
                    i = 0 if pos == "v" else len(words) - 1
                    words[i] = plural(words[i])
                    phrase = " ".join(words)
                if phrase not in out and phrase != word:
                    out.append(phrase)
        return tuple(out)


TEXT_OPS = ("synonyms",)


def parse_text_aug(spec: str | None, *, protected: Iterable[str] | None = None,
                   wordnet: str | Path | None = None) -> TextAugment | None:
    """'synonyms:2' → TextAugment replacing up to 2 words ('synonyms' alone means 1);
    '' / 'none' → None. `protected` defaults to the COCO class words (see `label_words`).
    Unknown ops, a bad count, or missing WordNet raise MmtagError."""
    text = (spec or "").strip().lower()
    if text in ("", "none"):
        return None
    op, sep, arg = (part.strip() for part in text.partition(":"))
    if op not in TEXT_OPS:
        raise MmtagError(f"unknown caption augmentation '{op}'; available: "
                         f"{', '.join(t + ':N' for t in TEXT_OPS)}")
    n = 1
    if sep:
        try:
            n = int(arg)
        except ValueError:
            raise MmtagError(f"caption augmentation '{spec}': count '{arg}' is not an integer") \
                from None
        if n < 1:
            raise MmtagError(f"caption augmentation '{spec}': count must be >= 1, got {n}")
    prot = _default_protected() if protected is None else frozenset(w.lower() for w in protected)
    return TextAugment(n=n, protected=prot, wordnet=wordnet)


__all__ = [
    "CLASS_ALIASES", "CROP_RATIO", "CROP_SCALE", "IMAGE_OPS", "INSTALL_HINT", "ImageAugment",
    "TEXT_OPS", "TextAugment", "WORDNET_DIRS", "WORDNET_ENV", "find_wordnet", "label_words",
    "parse_image_aug", "parse_text_aug", "plural", "wordnet_reader",
]
