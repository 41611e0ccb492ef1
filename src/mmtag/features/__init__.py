"""Features: encoder outputs per modality, cached by content."""
# The package's public names, wherever in it they live: other packages import from here.
from .types import (  # noqa: F401
    FEATURE_KINDS,
    IMAGE_POOL_KINDS,
    KIND_MODALITY,
    Features,
    concat_features,
    modality_of,
    FeatureSet,
)
from .cache import (  # noqa: F401
    SHARD_ITEMS,
    CorruptShard,
    FeatureCache,
    caption_key,
    file_key,
)
from .extract import (  # noqa: F401
    extract,
    extract_views,
    encode_images,
    encode_captions,
)
