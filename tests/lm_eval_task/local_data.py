"""`custom_dataset` for the tasks in this folder: lm-eval hands `dataset_kwargs.data_files` to
`datasets.load_dataset` as they are, so a relative path would be read from the working directory. Here it is
read from this folder, wherever the tests run."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_json(data_files: dict[str, str], **metadata):
    return datasets.load_dataset("json", data_files={split: str(HERE / f) for split, f in data_files.items()})
