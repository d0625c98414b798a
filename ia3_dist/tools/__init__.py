"""User-facing tools beside training: plan, slurm, inference (generate, chat), export, plots."""
