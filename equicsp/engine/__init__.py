"""Runs the model in one process: the sampler, compiled steps, the training loop, checkpoints."""
