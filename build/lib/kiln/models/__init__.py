"""Pure PyTorch: the CNN and char-RNN families, the char vocabulary, batched sampling and the
model folder format. Importing this package never imports Ray."""

__version__ = "0.1.0"

from .checkpoint import (  # noqa: E402
    CNNSpec,
    LoadedModel,
    ModelFolderError,
    RNNSpec,
    build_model,
    model_from_bytes,
    model_to_bytes,
)
from .cnn import CNN_ARCHS, build_cnn  # noqa: E402
from .rnn import CELLS, CharRNN  # noqa: E402
from .sampling import PRECISIONS, SamplingSettings, row_seed, sample  # noqa: E402
from .stepper import GPU_LANES, LANES  # noqa: E402
from .vocab import UNK, CharVocab  # noqa: E402

__all__ = [
    "CELLS", "CNN_ARCHS", "GPU_LANES", "LANES", "UNK", "CNNSpec", "CharRNN", "CharVocab",
    "LoadedModel", "ModelFolderError", "PRECISIONS", "RNNSpec", "SamplingSettings", "build_cnn",
    "build_model", "model_from_bytes", "model_to_bytes", "row_seed", "sample",
]
