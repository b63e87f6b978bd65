"""dsgraph's graph passes (installed as ``dsgraph.passes``)."""
from .attention import AttentionPass
from .hadamard import HadamardPass
from .indexer import IndexerPass
from .masks import MaskPass


def default_passes():
    """All passes, in any order: the pipeline orders them by what they need and provide."""
    return [AttentionPass(), HadamardPass(), IndexerPass(), MaskPass()]


__all__ = ["AttentionPass", "HadamardPass", "IndexerPass", "MaskPass", "default_passes"]
