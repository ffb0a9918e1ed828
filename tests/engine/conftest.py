"""Fixtures of the engine tests: a CNN trained once on scikit-learn's digits, shared by the session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models import DigitsCNN, digits_splits, save_scripted, test_accuracy, train_classifier


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Splits, the trained model's file (``model``), its test accuracy, and .npz files of the training split."""
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the same teacher whichever tests ran before
    splits = digits_splits()
    model = train_classifier(DigitsCNN(), splits["x_train"], splits["y_train"], epochs=15)
    root = tmp_path_factory.mktemp("digits")
    np.savez(root / "labelled.npz", inputs=splits["x_train"].numpy(), labels=splits["y_train"].numpy())
    np.savez(root / "unlabelled.npz", inputs=splits["x_train"].numpy())
    return {
        **splits,
        "model": save_scripted(model, root / "digits.pt"),
        "labelled": root / "labelled.npz",
        "unlabelled": root / "unlabelled.npz",
        "accuracy": test_accuracy(model, splits["x_test"], splits["y_test"]),
    }
