"""Triton kernels and their launch drivers, one file per op. Imported lazily: Triton is optional.

Kernels return indices or reductions only; the ops in :mod:`metricloss.ops` dispatch to them
(:func:`metricloss._backend.resolve_backend`) and keep autograd in torch.
"""
