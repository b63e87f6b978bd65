"""The ``dsgraph::`` custom ops. Importing this package registers them and their kernels."""
from . import (attention, conv1d, gated_norm, hadamard, indexer, masks, sinkhorn, sparse_attention, ssd,  # noqa: F401
               window_pool)
