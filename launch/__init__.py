"""ddpm-scale: launch (the only package that knows SLURM; training code never imports submitit).

- launch.submit: the `ddpm-submit` CLI (submitit; one task per GPU; requeue on exit 75).
- launch.slurm_env: SLURM environment -> torchrun environment (RANK, WORLD_SIZE, MASTER_*).
- launch/ddpm.sbatch: plain sbatch + `srun torchrun` template with the same resume behaviour.
"""
