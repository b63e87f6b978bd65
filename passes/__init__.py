"""dsgraph's graph passes (installed as ``dsgraph.passes``)."""
from .attention import AttentionPass
from .conv1d import CausalConv1dPass
from .gated_norm import GatedNormPass
from .hadamard import HadamardPass
from .indexer import IndexerPass
from .masks import MaskPass
from .mla_absorb import MLAAbsorbPass
from .pooling import PoolingPass
from .sinkhorn import SinkhornPass
from .ssd import SSDPass
from .sparse_attention import SparseAttentionPass
from .v4_attention import V4AttentionPass


def default_passes():
    """All passes, in any order: the pipeline orders them by what they need and provide."""
    return [AttentionPass(), CausalConv1dPass(), GatedNormPass(),
            HadamardPass(), IndexerPass(), MaskPass(), SparseAttentionPass(), V4AttentionPass(), MLAAbsorbPass(), SSDPass(),
            SinkhornPass(), PoolingPass()]


__all__ = ["AttentionPass", "CausalConv1dPass", "GatedNormPass",
           "HadamardPass", "IndexerPass", "MaskPass", "MLAAbsorbPass", "PoolingPass", "SinkhornPass", "SparseAttentionPass", "SSDPass", "V4AttentionPass",
           "default_passes"]
