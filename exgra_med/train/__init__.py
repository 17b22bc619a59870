"""Training: argument groups, the ExGra-Med trainer and the torchrun entry point."""
