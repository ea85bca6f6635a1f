"""compressor: structured pruning of CNNs through Torch-Pruning, with measured results."""
from .checkpoint import load, save
from .errors import CompressorError
from .plan import PruningPlan

__version__ = "0.1.0"
__all__ = ["load", "save", "PruningPlan", "CompressorError", "__version__"]
