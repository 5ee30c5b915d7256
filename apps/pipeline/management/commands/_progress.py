"""A tqdm progress bar factory shared by the pipeline commands."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


class StageProgress:
    """Creates one progress bar per stage; each bar counts rows as the stage reports them."""

    def __init__(self, *, disable: bool = False) -> None:
        self.disable = disable
        self._bar: tqdm | None = None

    def __call__(self, stage: str) -> Callable[[int], None]:
        self.close()
        self._bar = tqdm(
            desc=f"{stage:<17}", unit=" rows", unit_scale=True, disable=self.disable, leave=True
        )
        bar = self._bar
        return bar.update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
