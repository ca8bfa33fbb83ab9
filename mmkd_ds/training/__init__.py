"""The distillation loop and its parts: batches, optimiser, DeepSpeed config, checkpoints, metrics, export."""
