"""Kernels behind the dsgraph:: ops: one file per op family, its torch reference beside it."""
