"""Attention library: pure variants, position encodings and linen layers.

Layout everywhere: `[batch, *spatial, heads, head_dim]`, scores scaled by
`1/sqrt(head_dim)`. Variants are chosen by name from `ATTENTION_VARIANTS`,
whose entries (`AttentionVariant`) carry each variant's function and traits.

Modules: `functional` (`full_attention` and its backend dispatch, axial and
window layouts), `registry` (the named variants and their traits, the
window-vs-grid check), `chunked` (the exact blocked kernel with its custom
VJP, and the online-softmax block steps), `sequence_parallel` (ring and
all-to-all attention over sharded tokens, built on those block steps, and the
forms a variant takes on a seq-sharded mesh), `position` and `layers`.
"""
from medgen_jax.attention.functional import (
    attention_weights,
    axial_attention,
    full_attention,
    half_window_shift,
    shifted_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)
from medgen_jax.attention.layers import (
    CrossModalAttention,
    Mlp,
    MultiHeadAttention,
    TransformerBlock,
)
from medgen_jax.attention.registry import (
    ATTENTION_VARIANTS,
    AttentionVariant,
    check_window,
    get_attention,
    register_attention,
)
from medgen_jax.attention.sequence_parallel import (
    all_to_all_axial_attention,
    ring_attention,
    sequence_parallel_axial_attention,
    sequence_parallel_full_attention,
)
from medgen_jax.attention.position import (
    LearnedPositionEmbedding,
    RelativePositionBias,
    relative_position_index,
    sinusoidal_position_encoding,
)

__all__ = [
    "ATTENTION_VARIANTS",
    "AttentionVariant",
    "CrossModalAttention",
    "LearnedPositionEmbedding",
    "Mlp",
    "MultiHeadAttention",
    "RelativePositionBias",
    "TransformerBlock",
    "all_to_all_axial_attention",
    "attention_weights",
    "axial_attention",
    "check_window",
    "full_attention",
    "get_attention",
    "half_window_shift",
    "register_attention",
    "relative_position_index",
    "ring_attention",
    "sequence_parallel_axial_attention",
    "sequence_parallel_full_attention",
    "shifted_window_mask",
    "sinusoidal_position_encoding",
    "window_attention",
    "window_partition",
    "window_reverse",
]
