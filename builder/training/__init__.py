"""Training: the one loop, prompt initialisation, forward passes and the layer cache, hard-prompt heads, instruction
data and its LM-loss training, checkpoints and data-parallel workers."""
