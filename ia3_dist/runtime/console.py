"""What a run prints: our lines and the progress bar. Known third-party noise (DeepSpeed's accelerator and op-build
messages, transformers' load bars, deprecation warnings raised inside libraries) is filtered unless
``IA3_DIST_VERBOSE=1`` (or ``--verbose``) asks for everything. Only exact known messages are dropped: anything
new from a library still shows."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "IA3_DIST_VERBOSE"

# (category, message regex) of warnings libraries raise about their own internals; nothing a user can act on.
NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (UserWarning, r"torch\.utils\.checkpoint: the use_reentrant parameter"),
)
# Logger name -> message regexes.
NOISE_LOGS: dict[str, tuple[str, ...]] = {
    "DeepSpeed": (r"Setting accelerator to CPU", r"Unable to find hostfile"),
}
# Lines libraries print() straight to stdout.
NOISE_PRINTS = (re.compile(r"^DeepSpeed \S+ built successfully$"),)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropMatching(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def quiet_third_party() -> None:
    """Install the filters; called once at CLI start, before DeepSpeed or transformers are imported (filters on a
    named logger survive the library configuring that logger later)."""
    if verbose():
        return
    for category, pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
    for name, patterns in NOISE_LOGS.items():
        logging.getLogger(name).addFilter(_DropMatching(patterns))
    # transformers' per-file "Loading weights" / "Writing model shards" bars; our own tqdm bar is separate.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


class _LineFilter(io.TextIOBase):
    def __init__(self, target: io.TextIOBase) -> None:
        self.target = target
        self.buf = ""

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if not any(p.match(line) for p in NOISE_PRINTS):
                self.target.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        if self.buf:
            self.target.write(self.buf)
            self.buf = ""
        self.target.flush()


@contextlib.contextmanager
def filtered_prints() -> Iterator[None]:
    """Drop known library print() lines from stdout inside the block (e.g. DeepSpeed's op-build message)."""
    if verbose():
        yield
        return
    f = _LineFilter(sys.stdout)
    with contextlib.redirect_stdout(f):
        try:
            yield
        finally:
            f.flush()
