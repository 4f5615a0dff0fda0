"""Loader for the offline tasks in this directory (``custom_dataset: !function
local_data.load`` in their YAML): reads ``data/<data_file>`` next to this file, so the tasks work
from any working directory, in an installed package, and with no network (HF ``datasets`` would
need absolute ``data_files`` paths)."""

import json
from pathlib import Path

import datasets


def load(data_file: str, **_metadata):
    path = Path(__file__).resolve().parent / "data" / data_file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
