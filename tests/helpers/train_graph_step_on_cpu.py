"""``python -m mamba_train`` with the graph step's bookkeeping forced on where CUDA graphs are
not available (CPU): the step runs eagerly but through GraphedTrainStep -- flat gradient buffer,
in-place zeroing, its own DDP all-reduce -- so a CPU test can check that bookkeeping against
the plain Lightning path. Lightning's DDP launcher re-runs this script for rank 1."""

import mamba_train.training.step.cuda_graph as cuda_graph

cuda_graph.graph_blockers = lambda trainer, module: []

from mamba_train.cli.train import main  # noqa: E402

main()
