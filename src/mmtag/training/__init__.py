"""Training: the one loop, optimisers, losses, checkpoints, fine-tuning and pseudo-labels."""
