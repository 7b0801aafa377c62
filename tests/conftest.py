import os

# Tests never touch the network: a Hub call without network retries for ~25 s. Set before anything imports
# huggingface_hub or datasets, which read these when imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from train_script import own_signal_handlers  # noqa: E402


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Every test ends with pytest's own SIGTERM/SIGINT handlers, whatever train.main installed."""
    with own_signal_handlers():
        yield
