"""The run around the steps: callbacks, loggers, checkpoint I/O, which checkpoint to resume, the
run directory's lock, continued pretraining (``init_from``), SLURM and determinism set-up."""
