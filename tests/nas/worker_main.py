"""A search process for the storage tests: ``python -m tests.nas.worker_main CONFIG.json [worker]``.

Runs :func:`slimformer.nas.api.search` on the zoo model vit-digits-seq with the given
SearchConfig (JSON) and prints the number of sub-networks this process measured.
"""

import json
import sys

import torch


def digits():
    from slimformer.data.datasets import get_dataset
    from slimformer.nas.api import split_holdout

    train, val = split_holdout(get_dataset("digits-seq", "train"), 200)
    return train, val, get_dataset("digits-seq", "calib")


def main() -> None:
    torch.set_num_threads(1)
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ZooSpec
    from slimformer.nas.api import search
    from slimformer.nas.config import SearchConfig

    cfg = SearchConfig.model_validate(json.loads(open(sys.argv[1]).read()))
    train, val, calib = digits()
    model = load_model(ZooSpec(name="vit-digits-seq")).module
    res = search(model, cfg, train, val, calib_data=calib, worker="worker" in sys.argv[2:])
    print(json.dumps({"measured": len(res.measured)}))


if __name__ == "__main__":
    main()
