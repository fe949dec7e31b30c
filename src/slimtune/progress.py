"""How long phases (training steps, evaluation batches) show their progress: to a person or to a log.

A phase starts with its total, advances with the figures worth watching (the loss), and ends with
the figures worth keeping (a validation score). Where it goes:

- `Display`: on a terminal each phase is a tqdm bar, phases inside phases nested under it; anywhere
  else (a CI log, a file) each phase is one line, written when it ends, with no carriage returns:
  ``training: 40/40 steps in 108 s (2.70 s/step), loss 0.412``.
- `Relay`: a configuration of `slimtune compare` runs in a process of its own; its phases travel
  through a pipe to the study's process, whose `Display` draws them under the study's own bar.
- `Progress` itself: nothing (other processes of a data-parallel run).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A phase's progress, dropped. Subclasses show or send it."""

    def start(self, phase: str, total: int, unit: str, done: int = 0) -> None:
        """A phase of `total` units begins, `done` of them already done (a resumed training)."""

    def advance(self, n: int = 1, **figures: float) -> None:
        """`n` more units done; `figures` (the loss) are shown beside the bar, the latest kept."""

    def end(self, **figures: float) -> None:
        """The innermost open phase is over; `figures` (its scores) go into its line."""

    def close(self) -> None:
        """End every open phase (a configuration's process died in the middle of one)."""

    def apply(self, message: tuple) -> None:
        """Take up an event that a `Relay` sent."""
        kind, args, figures = message
        {"start": self.start, "advance": self.advance, "end": self.end}[kind](*args, **figures)


def figure_text(figures: dict[str, float], between: str = " ") -> str:
    """`loss 0.412, accuracy 0.760` (or `loss=0.412, ...` with `between="="`, beside a bar)."""
    return ", ".join(f"{name}{between}{value:.3f}" if isinstance(value, float) else f"{name}{between}{value}"
                     for name, value in figures.items())


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def pace(seconds: float, n: int, unit: str) -> str:
    """Seconds per unit when a unit takes a second or more, else units per second."""
    if n <= 0 or seconds <= 0:
        return ""
    return f"{seconds / n:.2f} s/{unit}" if seconds >= n else f"{n / seconds:.1f} {unit}s/s"


class _Phase:
    def __init__(self, name: str, total: int, unit: str, done: int, bar):
        self.name, self.total, self.unit, self.first, self.done = name, total, unit, done, done
        self.bar, self.started, self.figures = bar, time.perf_counter(), {}


class Display(Progress):
    """Phases on `stream` (stderr): tqdm bars on a terminal, one line per phase elsewhere.

    `depth` places the outermost phase: 1 is under another bar (the study's), its lines indented."""

    def __init__(self, stream: TextIO | None = None, terminal: bool | None = None, depth: int = 0):
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.depth = depth
        self.open: list[_Phase] = []

    def start(self, phase: str, total: int, unit: str, done: int = 0) -> None:
        bar = None
        if self.terminal:
            from tqdm.auto import tqdm

            position = self.depth + len(self.open)
            bar = tqdm(total=total, initial=done, desc=("  " * position) + phase, unit=unit, file=self.stream,
                       position=position, leave=position == 0, dynamic_ncols=True)
        self.open.append(_Phase(phase, total, unit, done, bar))

    def advance(self, n: int = 1, **figures: float) -> None:
        phase = self.open[-1]
        phase.done += n
        phase.figures.update(figures)
        if phase.bar is not None:
            if figures:
                phase.bar.set_postfix_str(figure_text(phase.figures, "="), refresh=False)
            phase.bar.update(n)

    def end(self, **figures: float) -> None:
        phase = self.open.pop()
        if phase.bar is not None:
            phase.bar.close()
            # The outermost bar stays (or is the study's to sum up); one inside it vanishes, so its scores,
            # if any, get a line.
            if not (figures and self.open):
                return
        seconds = time.perf_counter() - phase.started
        ran = phase.done - phase.first
        resumed = f" (resumed at {phase.first})" if phase.first else ""
        speed = pace(seconds, ran, phase.unit)
        shown = figure_text({**phase.figures, **figures})
        line = (f"{phase.name}: {phase.done}/{phase.total} {phase.unit}s{resumed} in {duration(seconds)}"
                + (f" ({speed})" if speed else "") + (f", {shown}" if shown else ""))
        self.write(line)

    def write(self, line: str) -> None:
        """A line of its own, above any bars, indented under the study's bar."""
        line = "  " * self.depth + line
        if self.terminal:
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        while self.open:
            phase = self.open.pop()
            if phase.bar is not None:
                phase.bar.close()


class Relay(Progress):
    """Phase events sent through a `multiprocessing` connection, for a `Display` in another process."""

    def __init__(self, connection):
        self.connection = connection

    def start(self, phase: str, total: int, unit: str, done: int = 0) -> None:
        self.connection.send(("start", (phase, total, unit, done), {}))

    def advance(self, n: int = 1, **figures: float) -> None:
        self.connection.send(("advance", (n,), figures))

    def end(self, **figures: float) -> None:
        self.connection.send(("end", (), figures))


class Study:
    """The progress of a study of many configurations: on a terminal a bar of configurations with the
    running one's phases nested under it, elsewhere a line as each configuration starts."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, terminal: bool | None = None):
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.total, self.label, self.started, self.count = total, label, time.perf_counter(), 0
        self.name, self.begun = "", self.started
        self.bar = None
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="run", file=self.stream, position=0, dynamic_ncols=True)
        self.phases = Display(self.stream, self.terminal, depth=1)

    def configuration(self, name: str) -> Display:
        """The next configuration begins; its phases go to the display returned."""
        self.count += 1
        self.name, self.begun = name, time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        else:
            elapsed = time.perf_counter() - self.started
            print(f"{self.label} {self.count}/{self.total}: {name}" + (f" ({duration(elapsed)} so far)" if elapsed >= 1 else ""),
                  file=self.stream, flush=True)
        return self.phases

    def reused(self, line: str) -> None:
        """The next configuration has a finished run: said in `line`, nothing runs."""
        self.count += 1
        self.note(line)
        if self.bar is not None:
            self.bar.update(1)

    def finished(self, outcome: str = "") -> None:
        """The running configuration is done. On a terminal, whose phase bars vanish, its
        `outcome` (its scores) stays as a line; a log has had a line for each of its phases."""
        self.phases.close()
        if self.bar is not None:
            if outcome:
                self.bar.write(f"{self.name}: {outcome} ({duration(time.perf_counter() - self.begun)})", file=self.stream)
            self.bar.update(1)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.phases.close()
        if self.bar is not None:
            self.bar.close()
