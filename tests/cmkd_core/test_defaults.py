"""The embedded default's images, read without importing scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from sklearn.datasets import load_digits

from cmkd_core.data.defaults import load_digit_images


def test_digit_images_are_scikit_learns_digits_scaled_to_unit_range():
    images, labels = load_digit_images()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, (bunch.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, bunch.target)
    assert images.min() == 0.0 and images.max() == 1.0


def test_reading_the_digit_images_does_not_import_scikit_learn():
    code = (
        "import sys; from cmkd_core.data.defaults import load_digit_images; "
        "load_digit_images(); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
