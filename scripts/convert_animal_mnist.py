"""Convert the Animal-MNIST wheel into the vendored ``hf_udkd/data/animal_mnist.npz``.

Animal-MNIST (PyPI ``animal-mnist==0.4``, MIT licence, by Sina Mohammadi) holds 10,000 real 28x28
greyscale animal silhouettes, 1,000 for each of 10 classes. The wheel stores them as gzip'd pickles of
numpy arrays; this script reads them with an unpickler that can rebuild plain numpy arrays and nothing
else, checks them, and writes a pickle-free npz plus the licence notice. To reproduce the vendored
files::

    pip download --no-deps animal-mnist==0.4 -d /tmp/am
    python scripts/convert_animal_mnist.py --wheel /tmp/am/animal_mnist-0.4-py3-none-any.whl

The npz holds ``images`` (uint8, ``(10000, 28, 28)``), ``labels`` (int64, ``(10000,)``) and
``class_names`` (unicode, ``(10,)``). The wheel has no train/test split, so none is stored.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import pickle
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

logger = logging.getLogger(__name__)

WHEEL_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
DATA_MEMBER = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABEL_MEMBER = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
METADATA_MEMBER = "animal_mnist-0.4.dist-info/METADATA"
LICENSE_MEMBER = "animal_mnist-0.4.dist-info/licenses/LICENSE"

# The wheel stores integer labels only. Its description lists the classes alphabetically, and the
# per-class image grid confirms that label i is the i-th name (checked by eye when vendoring).
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
PER_CLASS = 1000
IMAGE_SHAPE = (28, 28)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "hf_udkd" / "data"


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays of plain dtypes and refuses every other global.

    A pickled ndarray needs exactly three globals: ``ndarray``, ``dtype`` and ``_reconstruct``
    (found under ``numpy.core`` in pickles written by numpy 1, ``numpy._core`` by numpy 2).
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are expected in the wheel"
            ) from None


def load_pickled_array(payload: bytes) -> np.ndarray:
    """Unpickle one gzip'd numpy array with :class:`NumpyArrayUnpickler`."""
    array = NumpyArrayUnpickler(io.BytesIO(gzip.decompress(payload))).load()
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise ValueError(f"expected a numpy array of a plain dtype, got {type(array).__name__}")
    return array


def read_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Return ``(images, labels, licence text, author)`` from the animal-mnist 0.4 wheel."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (animal-mnist 0.4 from PyPI): "
            "fetch it with `pip download --no-deps animal-mnist==0.4`"
        )
    with zipfile.ZipFile(wheel) as zf:
        images = load_pickled_array(zf.read(DATA_MEMBER))
        labels = load_pickled_array(zf.read(LABEL_MEMBER))
        licence = zf.read(LICENSE_MEMBER).decode("utf-8")
        metadata = Parser().parsestr(zf.read(METADATA_MEMBER).decode("utf-8"))
    return images, labels, licence, metadata["Author-email"]


def check(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes, dtypes and class balance; return ``images`` as uint8 and ``labels`` as int64."""
    n = len(CLASS_NAMES) * PER_CLASS
    if images.shape != (n, *IMAGE_SHAPE) or labels.shape != (n,):
        raise ValueError(f"unexpected shapes: images {images.shape}, labels {labels.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    if counts.shape != (len(CLASS_NAMES),) or not (counts == PER_CLASS).all():
        raise ValueError(f"expected {PER_CLASS} images for each of {len(CLASS_NAMES)} labels, got {counts}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def licence_notice(licence: str, author: str) -> str:
    """The vendored data's licence file: provenance, then the wheel's MIT licence verbatim."""
    return (
        "The file animal_mnist.npz in this directory is the Animal-MNIST data set, converted by\n"
        "scripts/convert_animal_mnist.py from the PyPI wheel animal-mnist 0.4\n"
        f"(animal_mnist-0.4-py3-none-any.whl, sha256 {WHEEL_SHA256}).\n"
        f"Author: {author}\n"
        "It is distributed under the licence below, copied from the wheel.\n\n"
        f"{licence.rstrip()}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheel", type=Path, required=True, help="path to animal_mnist-0.4-py3-none-any.whl")
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write the npz and licence"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    images, labels, licence, author = read_wheel(args.wheel)
    images, labels = check(images, labels)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    npz_path = args.out_dir / "animal_mnist.npz"
    np.savez_compressed(npz_path, images=images, labels=labels, class_names=np.array(CLASS_NAMES))
    (args.out_dir / "LICENSE.animal_mnist").write_text(licence_notice(licence, author), encoding="utf-8")
    logger.info(
        f"wrote {npz_path} ({npz_path.stat().st_size} bytes): images {images.shape}, labels {labels.shape}"
    )


if __name__ == "__main__":
    main()
