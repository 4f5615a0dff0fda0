"""One optimizer step: the LightningModule, ``TrainStep`` (``train_step.py``), the captured CUDA
graph, the non-finite guard, optimizer groups, LR schedule, batch arithmetic, activation
checkpointing, and the strategies that spread the step over devices. Imports nothing of ``run``."""
