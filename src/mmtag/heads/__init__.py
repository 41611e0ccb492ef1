"""Heads: the registry of classifiers over features (single-modality, early and late fusion)."""
# The package's public names, wherever in it they live: other packages import from here.
# Importing a head module registers its heads, so the modules are imported in the order their
# heads must appear in HEADS (user-visible: `mmtag ablate` variants, help texts):
# image, text, concat, mean, union, gated, xattn, concat+mean, xattn+mean.
from .base import FeatureBatch, HeadOutput, mlp, Branches, Head, projection  # noqa: F401
from .registry import (  # noqa: F401
    HEADS,
    register_head,
    head_class,
    create_head,
    takes_unpaired,
    head_needs,
    heads_with_branches,
)
from .single import SingleModalityHead, ImageHead, TextHead  # noqa: F401
from .early import EARLY_FUSION_PARAMS, ConcatHead  # noqa: F401
from .late import LateFusionHead, MeanHead, UnionHead, GatedHead  # noqa: F401
from .cross_attention import CrossAttention, CrossAttentionHead  # noqa: F401
from .averaged import MeanWithBranchesHead, ConcatMeanHead, CrossAttentionMeanHead  # noqa: F401
from .ensemble import FoldEnsemble, StackedHead, can_stack, create_model_head  # noqa: F401
