"""Running categories: the task (train, then evaluate), the launcher (submitit, SLURM), requeue,
asking SLURM about jobs, and the collector with its report."""
