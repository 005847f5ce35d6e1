"""The one training loop and its parts: sharding, optimizer, checkpoints, metrics."""
