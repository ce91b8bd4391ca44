"""Model, ring attention, Grain loader, training loop, checkpoints, conversion, evaluation."""
