"""Task metrics on tiny random Hugging Face models (mechanics: a model vs itself, windows)."""

import math

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, make_loader
from slimformer.models import taskeval as T
from slimformer.models.loading import load_model
from slimformer.models.spec import HfConfigSpec

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=100, max_position_embeddings=64)


def _text_rows(n=12, t=10, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, t // 2:] = 0  # every other row padded: pooling must ignore the padding
    return TensorDictDataset({"input_ids": ids, "attention_mask": mask},
                             torch.arange(n) % 2)


def test_sentence_embedding_vs_itself_is_exact_and_masks_padding():
    m = load_model(HfConfigSpec(model_type="bert", config=TINY, task="sentence-embedding"))
    assert m.task == "sentence-embedding"
    ds = _text_rows()
    emb, _ = T.embed(m.module, make_loader(ds, 5), "sentence-embedding")
    assert emb.shape == (12, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(12), atol=1e-5)
    fid = T.embedding_fidelity(emb, emb)
    assert fid["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert fid["neighbour_agreement"] == 1.0
    # padding ignored: row 0 pooled with its padded tail equals row 0 cut to its real tokens
    row = {k: v[:1, :5] for k, v in ds.inputs.items()}
    with torch.no_grad():
        alone = T.sentence_embedding(m.module(**row), row["attention_mask"])
    assert torch.nn.functional.cosine_similarity(alone, emb[:1]).item() > 0.99999


def test_rows_by_length_give_the_same_embeddings_with_less_padding():
    m = load_model(HfConfigSpec(model_type="bert", config=TINY, task="sentence-embedding")).module
    g = torch.Generator().manual_seed(0)
    n, t = 40, 32
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ds = TensorDictDataset({"input_ids": torch.randint(3, 100, (n, t), generator=g),
                            "attention_mask": mask}, torch.arange(n) % 3)
    seen = []
    m.embeddings.register_forward_hook(lambda mod, args, out: seen.append(out.shape[:2].numel()))
    plain, y = T.embed(m, make_loader(ds, 8), "sentence-embedding")
    plain_tokens = sum(seen)
    seen.clear()
    sorted_ds = T.by_length(ds)
    emb, ys = T.embed(m, make_loader(sorted_ds, 8), "sentence-embedding")
    order = torch.argsort(lengths, stable=True)
    assert torch.equal(ys, y[order])  # labels follow their rows
    cos = torch.nn.functional.cosine_similarity(emb, plain[order])
    assert cos.min().item() > 0.99999  # masked padding changed no embedding
    assert sum(seen) < 0.75 * plain_tokens  # batches of similar length: less padding run
    assert T.by_length(TensorDictDataset({"pixel_values": torch.zeros(3, 3, 4, 4)})).inputs[
        "pixel_values"].shape == (3, 3, 4, 4)  # no attention mask: as is


def test_embedding_fidelity_drops_for_another_model():
    a = load_model(HfConfigSpec(model_type="bert", config=TINY, seed=0)).module
    b = load_model(HfConfigSpec(model_type="bert", config=TINY, seed=1)).module
    ds = _text_rows(n=30)
    ea, _ = T.embed(a, make_loader(ds, 8), "sentence-embedding")
    eb, _ = T.embed(b, make_loader(ds, 8), "sentence-embedding")
    fid = T.embedding_fidelity(ea, eb)
    assert fid["cosine_mean"] < 0.99 and fid["neighbour_agreement"] < 1.0


def test_image_features_and_knn_vs_itself():
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               image_size=16, patch_size=8, num_channels=3)
    for kind in ("vit", "dinov2"):
        m = load_model(HfConfigSpec(model_type=kind, config=cfg, task="image-features"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20, 3, 16, 16, generator=g)
        y = torch.arange(20) % 2
        x[y == 1] += 2.0  # two separable clusters
        feats, _ = T.embed(m.module, make_loader(TensorDictDataset({"pixel_values": x}, y), 8),
                           "image-features")
        assert T.embedding_fidelity(feats, feats)["cosine_min"] == pytest.approx(1.0, abs=1e-9)
        assert T.knn_accuracy(feats[:10], y[:10], feats[10:], y[10:], k=3) == 1.0


def test_probe_fits_float_embeddings_and_scores_each():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    e = torch.randn(200, 8, generator=g) + 3 * y[:, None].float()
    acc = T.probe_accuracy(e[:100], y[:100], {"float": e[100:], "noise": torch.randn(100, 8)},
                           y[100:])
    assert acc["float"] > 0.95 and acc["noise"] < 0.75


def _lm():
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=50, max_position_embeddings=64)
    return load_model(HfConfigSpec(model_type="llama", config=dict(cfg, num_key_value_heads=2),
                                   task="causal-lm"))


def test_perplexity_one_window_equals_the_models_own_loss():
    m = _lm()
    assert m.task == "causal-lm"
    stream = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(0))
    res = T.language_model_metrics(m.module, stream, max_length=64, reference=m.module)
    with torch.no_grad():
        loss = m.module(input_ids=stream[None], labels=stream[None]).loss
    assert res["tokens"] == 39
    assert res["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert res["top1_agreement"] == 1.0 and res["reference_perplexity"] == res["perplexity"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_perplexity_in_windows_equals_a_direct_computation(model_type):
    if model_type == "llama":
        model = _lm().module
    else:
        model = load_model(HfConfigSpec(model_type="gpt2", task="causal-lm", config=dict(
            n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64))).module
    stream = torch.randint(0, 50, (100,), generator=torch.Generator().manual_seed(1))
    res = T.language_model_metrics(model, stream, max_length=32, stride=12)
    # the documented recipe: each window's already-scored tokens are labelled -100
    nll, count, prev = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, 100, 12):
            end = min(begin + 32, 100)
            ids = stream[begin:end][None]
            labels = ids.clone()
            labels[:, :max(prev - begin, 0)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
            prev = end
            if end == 100:
                break
    assert res["tokens"] == count == 99
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_reference_windows_run_once_per_run():
    """A float model vs itself runs each window once; a reference cache lets a later call (the
    quantized model) run only the model, with the same metrics as recomputing the reference."""
    ref, other = _lm().module, load_model(HfConfigSpec(
        model_type="llama", task="causal-lm", seed=1, config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=50, max_position_embeddings=64, num_key_value_heads=2))).module
    calls = {"ref": 0, "other": 0}
    ref.register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    other.register_forward_hook(lambda *a: calls.__setitem__("other", calls["other"] + 1))
    stream = torch.randint(0, 50, (100,), generator=torch.Generator().manual_seed(2))
    cache: dict = {}
    itself = T.language_model_metrics(ref, stream, 32, 12, reference=ref, reference_cache=cache)
    windows = calls["ref"]
    assert windows == 7 and itself["top1_agreement"] == 1.0  # one forward a window (7 windows)
    assert itself["reference_perplexity"] == itself["perplexity"]
    cached = T.language_model_metrics(other, stream, 32, 12, reference=ref, reference_cache=cache)
    assert calls["ref"] == windows and calls["other"] == windows  # the reference did not run
    fresh = T.language_model_metrics(other, stream, 32, 12, reference=ref)
    assert calls["ref"] == 2 * windows
    assert cached == fresh and cached["reference_perplexity"] == itself["perplexity"]
    assert cached["top1_agreement"] < 1.0  # a different model is compared, not itself


def test_token_stream_keeps_real_tokens_in_row_order():
    ds = _text_rows(n=4, t=6)
    s = T.token_stream(ds)
    assert len(s) == 6 + 3 + 6 + 3
    ids = ds.inputs["input_ids"]  # row 0 padded after 3 tokens, row 1 not
    assert torch.equal(s[:9], torch.cat([ids[0, :3], ids[1]]))
    assert len(T.token_stream(ds, max_tokens=5)) == 5
