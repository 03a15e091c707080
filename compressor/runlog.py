"""The run's log file (``output.dir/compress.log``): a separator line per run, and its outcome whatever it was.

Every run appends to the same file: a line ``===== run <date>: <command>`` opens it, and the last line says how it
ended (finished, already complete, error, interrupted with the checkpointed blocks, failed with the traceback).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("compressor")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a compression; says what is checkpointed and how to resume."""

    def __init__(self, done: int, total: int | None, folder: Path | None, checkpointing: bool = True):
        super().__init__(f"interrupted: {done} of {total if total is not None else '?'} blocks checkpointed")
        self.done, self.total, self.folder, self.checkpointing = done, total, folder, checkpointing

    def line(self, command: str) -> str:
        """One line for the console: blocks checkpointed and the exact command that resumes."""
        if not self.checkpointing:
            return f"interrupted: nothing is checkpointed (output.checkpoint=false); rerunning starts over: {command}"
        if self.folder is None:
            return f"interrupted before anything was checkpointed, nothing to resume; rerun: {command}"
        if self.total is None:  # no prune stage: the later stages checkpoint (the greedy search after each step)
            return f"interrupted: finished steps are checkpointed in {self.folder}; resume with: {command}"
        total = self.total
        return f"interrupted: {self.done} of {total} blocks checkpointed in {self.folder}; resume with: {command}"


class RunLog:
    """Appends one run's section to ``path``: everything the ``compressor`` loggers say at INFO and above."""

    def __init__(self, path: Path, command: str | None = None, checkpointing: bool = True):
        self.started = time.perf_counter()
        self.checkpointing = checkpointing
        self.blocks_total: int | None = None
        self.checkpoints = None  # compressor.checkpoint.BlockCheckpoints once the run has them
        self.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        logger = logging.getLogger("compressor")
        logger.addHandler(self.handler)
        logger.setLevel(logging.INFO)
        date = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        self.handler.stream.write(f"===== run {date}: {command or ' '.join(sys.argv)}\n")
        self.handler.flush()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finished(self, outcome: str = "finished") -> None:
        log.info("%s in %.1fs", outcome, self.seconds())

    def interrupted(self) -> RunInterrupted:
        """Log the interruption; the exception to raise in place of the KeyboardInterrupt."""
        done = len(self.checkpoints.blocks) if self.checkpoints is not None else 0
        folder = self.checkpoints.folder if self.checkpoints is not None else None
        exc = RunInterrupted(done, self.blocks_total, folder, self.checkpointing)
        log.warning("interrupted (Ctrl-C) after %.1fs: %d of %s blocks checkpointed", self.seconds(), done,
                    self.blocks_total if self.blocks_total is not None else "?")
        return exc

    def failed(self, exc: BaseException) -> None:
        from compressor.config import ConfigError
        from compressor.data.text import DataError

        if isinstance(exc, (ConfigError, DataError)):
            log.error("error: %s", exc)
        else:
            log.error("failed after %.1fs", self.seconds(), exc_info=exc)

    def close(self) -> None:
        logging.getLogger("compressor").removeHandler(self.handler)
        self.handler.close()
