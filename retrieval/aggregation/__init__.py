"""Methods built on the descriptor interface: local features, codebooks and aggregated match kernels (VLAD,
ASMK, ASMK*, regional versions), regional search with a landmark detector, and the descriptor post-processing
the harness applies (whitening, query expansion / database augmentation)."""
