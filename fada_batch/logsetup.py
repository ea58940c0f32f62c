"""Logging for every process fada-batch runs in: the CLI, and submitit's task processes alike.

    setup_logging()            # at the top of `main` and of each submitted task

A submitted task is a fresh Python process that unpickles its callable: nothing from the CLI's
logging set-up is there. Without it, Python's last-resort handler prints every WARNING record,
and bitsandbytes logs one ("MatMul8bitLt: inputs will be cast from ... to float16") for every
8-bit matrix multiplication: ~190 lines per forward pass of blip2-opt-2.7b, millions in a
category's log. Here its records pass once per message, and the libraries' INFO chatter and
deprecation notices stay out unless `verbose`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO/WARNING records (progress, deprecations) are noise in a batch log.
QUIET = ("transformers", "peft", "accelerate", "urllib3", "httpx", "huggingface_hub")
# Libraries that repeat one warning per call: each message is shown once.
ONCE = ("bitsandbytes",)


class OncePerMessage(logging.Filter):
    """On a handler: passes each distinct message template of the loggers under `names` once
    (a filter on the `bitsandbytes` logger itself would not see its child loggers' records)."""

    def __init__(self, names: tuple[str, ...] = ONCE) -> None:
        super().__init__()
        self.names = names
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == n or record.name.startswith(n + ".") for n in self.names):
            return True
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_logging(verbose: bool = False) -> None:
    """Timestamped records on stderr; libraries quiet; repeated warnings once. Idempotent.

    Args:
        verbose: DEBUG for fada-batch and every library record (nothing filtered).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, stream=sys.stderr)
    logging.getLogger("fada_batch").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OncePerMessage) for f in handler.filters):
            handler.addFilter(OncePerMessage())
    # transformers reads these at import; when it is imported already, set them on it directly
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for module in ("transformers", "peft", "accelerate", "bitsandbytes", "torch"):
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=rf"{module}(\.|$)")
