"""Hydra configs (a package so `initialize_config_module("mamba_train.conf")` finds them)."""

# Keys that moved out of the trainer group (which holds only lightning.Trainer arguments):
# old key -> new key, refused with a one-line error naming the new one.
MOVED_KEYS = {"trainer.cuda_graph": "module.cuda_graph",
              "trainer.cuda_graph_allreduce": "module.cuda_graph_allreduce"}


def moved_key_message(old: str) -> str:
    """The one-line refusal of a key in MOVED_KEYS (command line and composed configs alike)."""
    new = MOVED_KEYS[old]
    return f"{old} is now {new} (the trainer group holds only lightning.Trainer arguments); use {new}=..."
