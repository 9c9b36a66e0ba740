"""The command line's progress bar: images done and images per second, per stage (tqdm, on a terminal only).

Shard tasks report when they finish (a shard task may run in another process, on a Dask worker), so the bar moves
one shard at a time; each stage also logs one line per shard with its images per second.
"""

from __future__ import annotations

from typing import IO, Any

from tqdm.auto import tqdm


class ShardProgress:
    """Counts the images of finished shards. ``enabled=False`` shows nothing (the command line enables it only
    when stderr is a terminal, so logs and pipes get the per-shard log lines instead).

    Args:
        stage: shown before the bar, for example ``"explain"``.
        total: images (files) the stage will go through.
        count: the key of a shard's result that holds its number of images.
        file: where the bar is drawn (default stderr).
    """

    def __init__(self, stage: str, total: int, count: str, enabled: bool, file: IO[str] | None = None) -> None:
        self.count = count
        self.bar = tqdm(total=total, desc=stage, unit="img", disable=not enabled, leave=True, file=file)

    def __call__(self, result: Any) -> None:
        if isinstance(result, dict):
            self.bar.update(int(result.get(self.count, 0)))

    def close(self) -> None:
        self.bar.close()
