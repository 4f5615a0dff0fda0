"""Training, in two parts: ``step`` (what one optimizer step computes and how it is spread over
devices: the LightningModule, the step, its captured graph, the non-finite guard, optimizer
groups, LR schedule, batch arithmetic, activation checkpointing, strategies) and ``run``
(everything around the steps: callbacks, loggers, checkpoints, resume, the run directory's lock,
continued pretraining, cluster and determinism set-up). ``run`` imports ``step``, never the
reverse; ``lightning_compat`` serves both."""
