"""Text records: local JSONL / Parquet files or `datasets` directories (via `datasets`, local files only),
and procedural reasoning-gym datasets. A source is a sized, indexable sequence of dicts."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["load_records", "quiet_import", "reasoning_gym_records"]

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_records(path: str, split: str = "train") -> Sequence[dict[str, Any]]:
    """A `datasets.Dataset` of the records at ``path``: a file (by suffix), a `save_to_disk` directory, or a
    directory of data files. Nothing is downloaded and no dataset script runs."""
    import datasets

    if not os.path.exists(path):
        raise ValueError(f"data.path {path!r} does not exist")
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split)
    else:
        builder = _BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(f"data.path {path!r}: unknown file type; use .jsonl, .json, .parquet, .csv, .arrow or "
                             "a datasets directory")
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.path {path!r} has splits {sorted(ds)}, not data.split={split!r}")
        ds = ds[split]
    if len(ds) == 0:
        raise ValueError(f"data.path {path!r} has no records")
    return ds


class _ReasoningGymRecords(Sequence):
    """Records of a reasoning-gym dataset, generated when indexed: {question, answer, metadata}."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        e = self.dataset[i]
        return {"question": e["question"], "answer": e["answer"], "metadata": e["metadata"]}


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """reasoning-gym's dependencies emit SyntaxWarnings when first compiled; they say nothing about our run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        yield


def reasoning_gym_records(name: str, size: int, seed: int, **kwargs: Any) -> Sequence[dict[str, Any]]:
    with quiet_import():
        import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"data.dataset {name!r} / data.dataset_kwargs {kwargs}: {e}") from None
    return _ReasoningGymRecords(ds)
