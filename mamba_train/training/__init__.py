"""Training: the LightningModule, optimizer groups, LR schedule, batch arithmetic, callbacks."""
