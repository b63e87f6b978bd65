"""dsgraph's graph passes (installed as ``dsgraph.passes``)."""
from .attention import AttentionPass
from .masks import MaskPass


def default_passes():
    """All passes, in any order: the pipeline orders them by what they need and provide."""
    return [AttentionPass(), MaskPass()]


__all__ = ["AttentionPass", "MaskPass", "default_passes"]
