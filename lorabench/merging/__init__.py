"""Merging independently trained adapters: methods registered by name, behind one function.

    from lorabench.merging import merge, read_update, capture_stats
    updates = [read_update(model, f) for f in files]          # lorabench, diffusers or kohya files
    result = merge(updates, {"name": "sum", "lam": 0.6})      # or ties, dare, svd, gradient_fusion, ...
    with merged_into(model_weights(model, result.deltas), result.deltas): ...   # sample the merged model

Methods: :mod:`lorabench.merging.methods`; input statistics for gradient fusion:
:mod:`lorabench.merging.capture`; crosstalk diagnostics: :mod:`lorabench.merging.crosstalk`. The merge
job (adapter files in, a merged file or UNet out) is :mod:`lorabench.protocols.merge_adapters`.
"""

from lorabench.merging.capture import (
    InputStats,
    capture_stats,
    load_stats,
    save_stats,
    setting_grams,
    text_gram,
    token_features,
)
from lorabench.merging.crosstalk import (
    concept_crosstalk,
    group_crosstalk,
    layer_means,
    output_error,
    pair_crosstalk,
    size_summary,
    update_size,
)
from lorabench.merging.methods import (
    MERGES,
    MergeResult,
    check_merge,
    fuse_closed_form,
    fuse_lbfgs,
    fusion_objective,
    get_merge,
    merge,
    register_merge,
)
from lorabench.merging.updates import (
    AdapterUpdate,
    FactorStack,
    LayerDelta,
    StackedDeltas,
    check_compatible,
    fold,
    merged_into,
    merged_pairs,
    model_weights,
    read_update,
    save_merged_adapter,
    save_merged_unet,
    updates_from_adapters,
)

__all__ = [
    "AdapterUpdate",
    "FactorStack",
    "InputStats",
    "LayerDelta",
    "StackedDeltas",
    "MERGES",
    "MergeResult",
    "capture_stats",
    "check_compatible",
    "check_merge",
    "concept_crosstalk",
    "fold",
    "fuse_closed_form",
    "fuse_lbfgs",
    "fusion_objective",
    "get_merge",
    "group_crosstalk",
    "layer_means",
    "load_stats",
    "merge",
    "merged_into",
    "model_weights",
    "output_error",
    "pair_crosstalk",
    "read_update",
    "register_merge",
    "merged_pairs",
    "save_merged_adapter",
    "save_merged_unet",
    "save_stats",
    "setting_grams",
    "size_summary",
    "text_gram",
    "token_features",
    "update_size",
    "updates_from_adapters",
]
