"""A bench backend for tests/test_bench.py, in a module of its own so that the bench's worker process can
import it: the module itself, except that a batch of 2 never returns."""
import time

import torch

from compressor.bench import backends as B


def build(model, b: B.Build) -> B.Prepared:
    def call(x):
        if x.shape[0] == 2:
            torch.set_grad_enabled(False)  # what a no_grad block cut half-way by a timer left behind
            time.sleep(3600)
        return model(x)

    return B.Prepared(call, b.dtype, False, note="hangs at batch 2", artifact=b.checkpoint, format="pt")
