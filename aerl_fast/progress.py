"""Progress bars of the long stages (training epochs, attacks): tqdm on stderr, off when asked or
when stderr is not a terminal, never left on screen."""
from __future__ import annotations

import sys


def bar_factory(enabled: bool, unit: str):
    """make(total, desc, initial=0) -> a tqdm bar (a silent one when `enabled` is False)."""
    from tqdm import tqdm  # noqa: PLC0415

    def make(total, desc, initial=0):
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=False, file=sys.stderr,
                    disable=None if enabled else True, dynamic_ncols=True)
    return make
