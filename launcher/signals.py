"""Turn SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) to `lorasp launch` into the engine's stop file.

SLURM warns a job before preemption or its time limit (`--signal=B:USR1@SECONDS`, `scancel --signal=USR1 --batch`);
the batch script forwards that to us. Ray Train workers run the train function off their main thread, where Python
cannot install signal handlers, so the request travels as a file in the shared run directory instead: every rank
checks `RUN_DIR/STOP` at each step boundary, all stop at the same step, checkpoint and return. A second Ctrl-C
aborts at once, without a checkpoint (KeyboardInterrupt: `lorasp` exits 130).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopRelay:
    """`with StopRelay() as relay:` from now on the first stop signal is a stop request; once `relay.arm(stop_file)`
    names the file (the run directory exists), the request touches it. `relay.signal_name` says which signal came.
    Later signals only repeat that the stop is under way (the checkpoint in progress must finish), except a second
    Ctrl-C: someone at the terminal who will not wait."""

    def __init__(self) -> None:
        self.stop_file: Path | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """(Again) make our handler the one: `ray.init` installs its own SIGTERM handler in the driver."""
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def arm(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        if self.signal_name is not None:  # the request came while we were starting: deliver it now
            stop_file.touch()

    def disarm(self) -> None:
        """The run is over, however it ended: a request it never took up is withdrawn, and a later signal touches no
        file, so no later run of the directory finds a stale STOP."""
        stop_file, self.stop_file = self.stop_file, None
        if stop_file is not None:
            stop_file.unlink(missing_ok=True)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            if self.stop_file is not None:
                self.stop_file.touch()
            msg = f"[lorasp] {name}: every rank checkpoints and stops at the next step boundary\n"
        elif signum == signal.SIGINT:
            os.write(2, b"[lorasp] SIGINT again: aborting now, without a checkpoint\n")
            raise KeyboardInterrupt
        else:
            msg = f"[lorasp] {name}: already stopping, waiting for the checkpoint (Ctrl-C again to abort)\n"
        os.write(2, msg.encode())  # not print(): a signal handler may interrupt a print in progress

    def __enter__(self) -> StopRelay:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
