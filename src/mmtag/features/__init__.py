"""Features: encoder outputs per modality, cached by content."""
# The package's public names, wherever in it they live: other packages import from here.
from .extract import (  # noqa: F401
    FEATURE_KINDS,
    SHARD_ITEMS,
    Features,
    concat_features,
    FeatureSet,
    CorruptShard,
    FeatureCache,
    caption_key,
    file_key,
    extract,
    extract_views,
    encode_images,
    encode_captions,
)
