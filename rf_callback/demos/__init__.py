"""The runnable example, kept apart from the library as ``lightning.pytorch.demos`` is: nothing in
:mod:`rf_callback` imports it.

* :mod:`rf_callback.demos.fashion_mnist` — :class:`FashionMNISTDataModule`, found offline.
* :mod:`rf_callback.demos.cnns` — :class:`SmallCNN`, :class:`ResidualCNN`, :class:`DilatedCNN`.
"""

from rf_callback.demos.cnns import DilatedCNN, FashionMNISTClassifier, ResidualCNN, SmallCNN
from rf_callback.demos.fashion_mnist import FashionMNISTDataModule

__all__ = ["DilatedCNN", "FashionMNISTClassifier", "FashionMNISTDataModule", "ResidualCNN", "SmallCNN"]
