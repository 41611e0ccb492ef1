"""Encoders: frozen pretrained towers per modality, behind one registry."""
# The package's public names, wherever in it they live: other packages import from here. The
# built-in encoders are declared in mmtag.registries and imported when first looked up.
from .base import (  # noqa: F401
    Encoder,
    EncoderEntry,
    EncoderFamily,
    ImageEncoder,
    TextEncoder,
    sha256_file,
    error_summary,
    read_safetensors,
    load_weights,
)
from .registry import (  # noqa: F401
    ENCODERS,
    FAMILIES,
    register_encoder,
    register_prefix,
    encoder_names,
    encoder_entry,
    create_encoder,
    load_encoder,
    EncoderInfo,
    list_encoders,
)
from .efficientnet import EfficientNetLite  # noqa: F401
from .hf_text import (  # noqa: F401
    HFTextEncoder,
    hf_text_from_dir,
    hf_text_from_bundle,
    PICKLE_WEIGHTS,
)
from .mpnet import MPNET_DIR_ENV, mpnet_dir, mpnet_present  # noqa: F401
from .timm import TimmImageEncoder  # noqa: F401
from .combined import FlipEncoder, ConcatEncoder  # noqa: F401
from .onnx import (  # noqa: F401
    ONNX_MODEL_FILE,
    RUN_BATCH,
    OnnxEncoder,
    OnnxImageEncoder,
    OnnxTextEncoder,
    load_onnx_encoder,
)
from .onnx_export import (  # noqa: F401
    MIN_COSINE,
    OPSET,
    TWIN_DIR,
    export_encoder,
    export_image_encoder,
    export_text_encoder,
    runtime_twin,
    twin_traced,
)
