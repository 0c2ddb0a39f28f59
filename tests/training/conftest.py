"""Keras runs on its PyTorch backend here; it must be chosen before keras is imported."""

import os

os.environ["KERAS_BACKEND"] = "torch"
