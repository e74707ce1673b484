"""The hot path behind one interface per op: backend dispatch plus the chunked-torch implementation.

``distance``, ``labels`` and ``reduction`` are the shared building blocks (one concept, one place);
``mining`` and ``triplet`` are ops built on them.
"""
