"""Pieces of the training script that are not the loop itself: batches, LR schedule, logging, checkpoints."""
