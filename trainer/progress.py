"""The progress bar on rank 0: step, loss, tokens/s and ETA (tqdm does the ETA)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train") -> None:
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0,
                file=sys.stderr,
            )
            if enabled
            else None
        )

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"loss {loss:.4f} | {tokens_per_second / 1000:.1f}k tok/s", refresh=False
        )
        self.bar.update(step - self.bar.n)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
