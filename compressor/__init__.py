"""compressor: structured pruning of CNNs through Torch-Pruning, with measured results."""
from .checkpoint import load, save
from .errors import CompressorError
from .plan import PruningPlan
from .record import RunRecord

__version__ = "0.1.0"
__all__ = ["load", "save", "PruningPlan", "RunRecord", "CompressorError", "__version__"]
