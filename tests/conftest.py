import os

# Keep CPU tests deterministic and quiet; must run before JAX initialises.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
