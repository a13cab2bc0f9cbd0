"""Built-in sets prepared for a Hugging Face vision model by its own image processor."""

import numpy as np
import pytest
import torch

from slimformer.data import fashion_mnist
from slimformer.data.datasets import get_dataset, seeded_rows

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tiny_dinov2(folder):
    """A random 1-layer DINOv2 at 32x32 with an ImageNet-style processor (resize 40, crop 32)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, mlp_ratio=2)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                      image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """:func:`build_tiny_dinov2` in a temporary folder."""
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))


def test_fashion_mnist_through_the_model_processor(tiny_dinov2):
    ds = get_dataset("fashion-mnist", "test", limit=6, processor=tiny_dinov2)
    x = ds.inputs["pixel_values"]
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32  # (3, crop H, crop W)
    raw, labels = fashion_mnist.load_arrays("test")
    assert ds.labels.tolist() == labels[:6].tolist()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = x * std + mean  # undo the normalization: [0, 1] grey copied to R, G and B
    torch.testing.assert_close(pixels[:, 1], pixels[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels[:, 2], pixels[:, 0], rtol=0, atol=1e-5)
    assert pixels.min() > -0.02 and pixels.max() < 1.02
    # a black corner of the 28x28 image stays black after resize and crop: exactly -mean / std
    black = torch.from_numpy((raw[:6, :6, :6] == 0).all((1, 2)))
    assert black.sum() >= 3
    torch.testing.assert_close(x[black, :, 0, 0], (-mean / std).view(1, 3).expand(int(black.sum()), 3),
                               rtol=0, atol=1e-4)
    # the processor's steps done by hand: bicubic resize to 40x40, centre crop 32x32, / 255
    from PIL import Image

    want = torch.stack([torch.from_numpy(np.asarray(
        Image.fromarray(a).resize((40, 40), Image.Resampling.BICUBIC), np.float32)[4:36, 4:36])
        for a in raw[:6]]) / 255
    torch.testing.assert_close(pixels[:, 0], want, rtol=0, atol=1.01 / 255)  # one grey level


def test_only_the_sampled_rows_are_prepared(tiny_dinov2):
    ds = get_dataset("fashion-mnist", "train", processor=tiny_dinov2, sample=7)
    _, labels = fashion_mnist.load_arrays("train")
    idx = seeded_rows(len(labels), 7)
    assert len(ds) == 7 and ds.labels.tolist() == labels[idx.numpy()].tolist()
    plain = get_dataset("fashion-mnist", "train", sample=7)  # the same rows without a processor
    assert plain.labels.tolist() == ds.labels.tolist()
    assert plain.inputs["pixel_values"].shape == (7, 1, 28, 28)


def test_pack_windows_concatenates_real_tokens_in_order_per_part():
    """Rows' real tokens (either padding side) run on as windows; the rows past ``split_at``
    are packed apart; inputs other than token ids are refused."""
    import pytest

    from slimformer.data.datasets import TensorDictDataset, pack_windows
    from slimformer.errors import DataError

    ids = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 0], [6, 7, 8, 9], [0, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]])
    ds = TensorDictDataset({"input_ids": ids, "attention_mask": mask})
    out, first = pack_windows(ds, 3, 2)
    assert first == 2  # tokens 1..5 -> [1 2 3] [4 5 .]; then 6..12 -> [6 7 8] [9 10 11] [12 . .]
    assert out.inputs["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 10, 11],
                                                [12, 0, 0]]
    assert out.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1],
                                                     [1, 0, 0]]
    whole, first = pack_windows(TensorDictDataset({"input_ids": ids[2:]}), 4, 2)
    assert first == 2 and "attention_mask" not in whole.inputs
    assert whole.inputs["input_ids"].tolist() == [[6, 7, 8, 9], [0, 10, 11, 12]]
    with pytest.raises(DataError, match="pack token rows"):
        pack_windows(TensorDictDataset({"input_ids": ids, "token_type_ids": ids}), 3, 2)
