"""The front ends' terminal stays ours: library chatter (transformers' and diffusers' notices, tqdm
bars, Python warnings such as a dependency's FutureWarning) goes to a log file in the data dir.

Called before transformers, diffusers or huggingface_hub are imported (they read these variables
once, at import); a variable the user set is kept, so `TRANSFORMERS_VERBOSITY=info nextgpt ask ...`
still shows everything."""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_FILE = "nextgpt.log"


def quiet_logging(data_dir: Path) -> Path | None:
    """Send warnings and library logs to `<data_dir>/nextgpt.log`; returns its path (None when the
    folder cannot be written: then they are dropped)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bars over the prompt or the answer
    # nor plain tqdm ones (transformers' "Converting and de-quantizing GGUF tensors" on a first start)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.captureWarnings(True)
    root = logging.getLogger()
    path = data_dir / LOG_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    except OSError:
        handler, path = logging.NullHandler(), None
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)  # a handler on root also keeps logging's last-resort stderr printer quiet
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    return path
