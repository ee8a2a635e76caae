"""Local learning: data, models, central pre-training, the training loop, LoRA."""
