"""The ``dsgraph::`` custom ops. Importing this package registers them and their kernels."""
from . import attention, hadamard, indexer, masks  # noqa: F401
