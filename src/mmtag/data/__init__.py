"""Data: datasets and label spaces, the CSV reader, image decoding and the one image loader, augmentation, synthetic data."""
# The package's public names, wherever in it they live: other packages import from here.
from .dataset import (  # noqa: F401
    DISPLAY_CHARS,
    display_name,
    COCO,
    label_names_of,
    LabelSpace,
    LabelVocab,
    Dataset,
    shared_vocab,
    train_val_split,
)
from .reader import (  # noqa: F401
    MAX_CAPTION_CHARS,
    CsvFormat,
    ReadResult,
    parse_labels,
    check_image_id,
    read_csv,
    read_dataset,
)
from .images import (  # noqa: F401
    IMAGE_FORMATS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageFiles,
    locate_images,
    check_images_exist,
    check_images_decode,
    decode_image,
    decode_thumbnail,
    normalize_images,
    load_image,
    open_image_bytes,
)
from .groups import (  # noqa: F401
    RepeatedIds,
    RowGroups,
    caption_identity,
    file_digest,
    image_keys,
    repeated_ids,
    row_groups,
)
from .coco import COCO_NAMES  # noqa: F401
from .augment import (  # noqa: F401
    CLASS_ALIASES,
    CROP_RATIO,
    CROP_SCALE,
    IMAGE_OPS,
    INSTALL_HINT,
    ImageAugment,
    TEXT_OPS,
    TextAugment,
    WORDNET_DIRS,
    WORDNET_ENV,
    find_wordnet,
    label_words,
    parse_image_aug,
    parse_text_aug,
    plural,
    wordnet_reader,
)
from .synthetic import (  # noqa: F401
    IMAGE_LABELS,
    TEXT_LABELS,
    SyntheticPaths,
    make_dataset,
)

# The one image loader (`loader`) imports torch: its names are loaded on first use (PEP 562), so
# reading a CSV, checking its images and listing augmentations (`mmtag check`, `--help`) do not.
LOADER = ("ImageItem", "ImageBatch", "ImageItems", "collate_images", "image_batches", "image_loader")


def __getattr__(name: str) -> object:
    if name in LOADER:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
