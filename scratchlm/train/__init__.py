"""The training loop shared by every stage: optimizer, schedule, precision, checkpoints, logging."""
