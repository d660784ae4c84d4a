"""Pieces of the training loop that train.py composes: training sets, image batches, checkpoints."""
