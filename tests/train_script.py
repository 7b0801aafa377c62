"""train.py loaded as a module, for the tests that run train.main(argv) in their own process (a subprocess spends
seconds importing torch), and the guard that gives pytest its signal handlers back afterwards."""

import contextlib
import importlib.util
import signal
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
_spec = importlib.util.spec_from_file_location("train", TRAIN_PY)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


@contextlib.contextmanager
def own_signal_handlers():
    """train.main installs SIGTERM/SIGINT handlers; give pytest its own back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
