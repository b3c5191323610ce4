"""The real-tensor count of the estimate's two steps under torchrun --fsdp, for test_estimate.py:

    torchrun --nproc_per_node 2 tests/estimate_driver.py MODEL MODE:DTYPE[:nf4] ...

Every rank runs bitfit's setup (shard_model included) and the steps of each case in turn; rank 0
prints one JSON line a case, with its peak.
"""

import json
import sys

import torch
from test_estimate import FSDP_SETTINGS, example, real_peak

from bitfit.config import TrainConfig
from bitfit.parallel import torchrun


def main(model: str, *cases: str) -> None:
    world = torchrun.setup(torch.device("cpu"))
    try:
        for case in cases:
            mode, dtype, quantize = (case.split(":") + [None])[:3]
            config = TrainConfig(mode=mode, dtype=dtype, quantize=quantize, model=model, **FSDP_SETTINGS)
            peak, _ = real_peak(model, config, example(96), world=world)
            if world.is_main:
                print(json.dumps({"case": case, "peak": peak}), flush=True)
    finally:
        torchrun.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:])
