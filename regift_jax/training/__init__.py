"""Training stage: the SFT train step, optimiser, checkpointing, metrics and the loop."""
