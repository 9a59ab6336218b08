"""What a training run prints: a progress bar with the current losses, or plain log lines.

With ``TrainConfig.progress`` and tqdm installed, a bar shows the step count and the latest
losses; otherwise a line with the mean of each loss since the previous line is printed every
``log_every`` steps (and at the last step). Messages (a resume, an evaluation, why a run
stopped) go above the bar, or to stdout without one.
"""

from __future__ import annotations

import math

from .progress import progress_bar


class TrainConsole:
    """The console of one ``Trainer.train()`` call: :meth:`open`, :meth:`report` each step,
    :meth:`say` for messages, :meth:`close` (before a message that must follow the bar)."""

    def __init__(self) -> None:
        self.bar = None  # the tqdm bar while train() runs with progress
        self._window: dict[str, list[float]] = {}  # losses since the last plain log line

    def open(self, progress: bool, max_steps: int, step: int) -> None:
        self.close()
        self._window = {}
        if progress:
            self.bar = progress_bar(max_steps, "train", "step", initial=step, dynamic_ncols=True)

    def report(self, step: int, max_steps: int, log_every: int, lr: float, losses: dict) -> None:
        """Bar postfix every step, or a plain line of means every ``log_every`` steps; ``lr``
        is the rate the step used."""
        if self.bar is not None:
            shown = {**losses, "total": math.fsum(losses.values())}
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)
            return
        self._window = {k: self._window.get(k, []) + [v] for k, v in losses.items()}
        if step % log_every and step != max_steps:
            return
        means = {k: math.fsum(v) / len(v) for k, v in self._window.items()}
        parts = [f"{k} {v:.4f}" for k, v in means.items()]
        parts.append(f"total {math.fsum(means.values()):.4f}")
        print(f"step {step}/{max_steps}  lr {lr:.5g}  " + "  ".join(parts))
        self._window = {}

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
