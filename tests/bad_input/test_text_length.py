"""Text longer than the model's position table: refused by name, not a shape error."""

import pytest


def test_text_max_length_beyond_the_model_positions_is_refused(tmp_path):
    from slimformer.errors import DataError
    from slimformer.stages.context import DataConfig, RunData

    from ..stages.test_context import _bert64, _long_text

    spec = _long_text(tmp_path) | {"max_length": 100}
    with pytest.raises(DataError, match=r"max_length 100 is more tokens than the model has "
                                        r"positions \(64.*give max_length <= 64"):
        RunData(_bert64(), DataConfig(eval=spec, calib=spec)).get("eval")
