import os
import sys

# Tests are deterministic and run on CPU; sub-processes set their own device counts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REGIFT_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
