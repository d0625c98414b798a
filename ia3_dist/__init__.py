"""ia3-dist: IA3 fine-tuning of Bloom-family causal LMs on DeepSpeed, from one CPU box to SLURM clusters."""

__version__ = "0.1.0"
