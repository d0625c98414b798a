"""The distributed runtime: rank layout and collectives (:mod:`.dist`, the only reader of RANK and SLURM_*), the
DeepSpeed config, checkpoints, the adapter save, signals and host memory. Knows nothing of data or training."""
