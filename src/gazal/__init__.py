"""Gazal: train a medical reasoning model the Gazal-R1 way (SFT with DoRA + rsLoRA, then GRPO) and evaluate it."""

__version__ = "0.1.0"
