"""``python -m compressor``: the ``compress`` command, and the entry ``torchrun -m compressor run ...`` launches."""
import sys

from .cli import main

sys.exit(main())
