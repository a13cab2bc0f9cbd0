"""Rows, deployed models and task metrics of benchmarks/real.py (one configuration's worker side).

Tasks (``slimformer.models.taskeval``):

- ``sentence-embedding``: vader-movie; ``--rows`` held-out test sentences (evenly spaced over
  the split), ``--calib`` calibration rows and a ``--bank``-row probe bank drawn disjoint from
  the train split (seed 0);
- ``image-features``: Fashion-MNIST prepared by the model's own image processor (3x224x224);
  the first ``--images`` test images, ``--calib`` calibration and ``--bank`` k-NN bank images
  drawn disjoint from a seeded sample of the train split;
- ``causal-lm``: nyt-editorials; ``--tokens`` test tokens, ``--lm-calib`` train rows.
"""

from __future__ import annotations

from pathlib import Path

THREADS = 2
SEQ = 128  # tokens of a latency input (encoders, LM prefill)


def load(name: str):
    """The zoo model ``name`` (a ``LoadedModel``) and its Hugging Face folder."""
    from slimformer.models.loading import load_model, parse_model_arg
    from slimformer.models.pretrained.install import model_dir

    return load_model(parse_model_arg(name)), str(model_dir(name))


def rows(task: str, folder: str, args) -> dict:
    """``eval`` / ``calib`` / ``bank`` data sets (``stream`` of test tokens for a causal LM)."""
    import torch

    from slimformer.data.datasets import get_dataset

    if task == "causal-lm":
        from slimformer.models import taskeval as T

        test = get_dataset("nyt-editorials", "test", tokenizer=folder)
        calib = get_dataset("nyt-editorials", "train", tokenizer=folder)
        return {"stream": T.token_stream(test, args.tokens), "calib": calib.select(slice(0, args.lm_calib))}
    if task == "image-features":
        n = args.calib + args.bank
        train = get_dataset("fashion-mnist", "train", processor=folder, sample=n)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(train), generator=g)
        return {"eval": get_dataset("fashion-mnist", "test", processor=folder, limit=args.images),
                "calib": train.select(perm[:args.calib].sort().values),
                "bank": train.select(perm[args.calib:].sort().values)}
    test = get_dataset("vader-movie", "test", tokenizer=folder)
    train = get_dataset("vader-movie", "train", tokenizer=folder)
    g = torch.Generator().manual_seed(0)
    idx = torch.linspace(0, len(test) - 1, min(args.rows, len(test))).round().long()
    perm = torch.randperm(len(train), generator=g)
    calib = train.select(perm[:args.calib].sort().values)
    bank = train.select(perm[args.calib:args.calib + args.bank].sort().values)  # disjoint
    return {"eval": test.select(idx), "calib": calib, "bank": bank}


def calib_feeds(calib, names, n: int, batch: int) -> list[dict]:
    """Numpy feeds of the first ``n`` calibration rows, ``batch`` rows each, inputs in ``names``."""
    return [{k: v[i:i + batch].numpy() for k, v in calib.inputs.items() if k in names}
            for i in range(0, min(n, len(calib)), batch)]


class Deployed:
    """An ONNX Runtime session or OpenVINO compiled model called like a Hugging Face model."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".onnx":
            from slimformer.export.ortrun import run_all, session

            self.sess = session(path, THREADS)
            self.names = {i.name for i in self.sess.get_inputs()}
            self.dynamic_seq = all(len(i.shape) < 2 or not isinstance(i.shape[1], int)
                                   for i in self.sess.get_inputs())
        else:
            from slimformer.export.openvino import compile_model, run_all

            self.sess = compile_model(str(path), threads=THREADS)
            self.names = {n for i in self.sess.inputs for n in i.get_names()}
            self.dynamic_seq = all(i.get_partial_shape().rank.get_length() < 2
                                   or i.get_partial_shape()[1].is_dynamic for i in self.sess.inputs)
        self._run = lambda x: run_all(self.sess, x)

    def __call__(self, **inputs):
        import torch

        if "attention_mask" in self.names and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        out = self._run({k: v for k, v in inputs.items() if k in self.names})
        res = {}
        for k, v in out.items():
            t = torch.from_numpy(v)
            if "logits" in k or (v.ndim == 3 and v.shape[-1] > 10_000):
                res["logits"] = t
            elif v.ndim == 3 and "last_hidden_state" not in res:
                res["last_hidden_state"] = t
            elif v.ndim == 2 and v.dtype.kind == "f":  # (B, H): a pooled output
                res.setdefault("pooler_output", t)
        if not res:
            res["last_hidden_state"] = torch.from_numpy(next(iter(out.values())))
        return res

    def eval(self):
        return self


def embed(model, ds, task: str, batch: int = 32):
    """Embeddings ``(N, H)`` of ``ds`` by ``model`` (torch or :class:`Deployed`), in row order.

    Sentences run in batches of similar length (rows sorted by their attention-mask length),
    each batch cut to its longest row, as a serving stack batches them: the data set pads every
    row to its maximum (vader-movie: 64 tokens, 27 real on average), so this halves the cost,
    and masked padding changes no real position of a float model. A deployed model with a
    static sequence axis gets the full padded rows.
    """
    import torch

    from slimformer.models import taskeval as T

    mask = ds.inputs.get("attention_mask")
    trim = mask is not None and getattr(model, "dynamic_seq", True)
    order = (torch.argsort(mask.sum(1), stable=True) if trim else torch.arange(len(ds)))
    embs = []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            rows = order[i:i + batch]
            x = {k: v[rows] for k, v in ds.inputs.items()}
            if trim:
                n = int(x["attention_mask"].sum(1).max())
                x = {k: v[:, :n] if v.dim() == 2 else v for k, v in x.items()}
            out = model(**x)
            embs.append(T.sentence_embedding(out, x.get("attention_mask"))
                        if task == "sentence-embedding" else T.image_features(out))
    return torch.cat(embs)[torch.argsort(order)]


def reference(lm, data: dict, work: Path) -> None:
    """Save the float PyTorch model's embeddings of the eval and bank rows to ``work/ref.pt``."""
    import torch

    ref = {"eval": embed(lm.module, data["eval"], lm.task), "bank": embed(lm.module, data["bank"], lm.task),
           "eval_y": data["eval"].labels, "bank_y": data["bank"].labels}
    torch.save(ref, work / "ref.pt")


def metrics(model, lm, data: dict, work: Path) -> dict:
    """The task metrics of ``model`` (deployed or torch) against the float PyTorch model."""
    import torch

    from slimformer.models import taskeval as T

    if lm.task == "causal-lm":
        m = T.language_model_metrics(model, data["stream"], min(1024, len(data["stream"])),
                                     reference=lm.module)
        return {"perplexity": m["perplexity"], "perplexity_float": m["reference_perplexity"],
                "top1_agreement": m["top1_agreement"], "tokens": m["tokens"]}
    ref = torch.load(work / "ref.pt")
    got = embed(model, data["eval"], lm.task)
    res = T.embedding_fidelity(ref["eval"], got) | {"rows": len(got)}
    if lm.task == "image-features":
        return res | {"knn_accuracy": T.knn_accuracy(ref["bank"], ref["bank_y"], got, ref["eval_y"]),
                      "knn_accuracy_float": T.knn_accuracy(ref["bank"], ref["bank_y"], ref["eval"],
                                                           ref["eval_y"])}
    acc = T.probe_accuracy(ref["bank"], ref["bank_y"], {"m": got, "f": ref["eval"]}, ref["eval_y"])
    return res | {"probe_accuracy": acc["m"], "probe_accuracy_float": acc["f"]}


def latency_input(task: str, folder: str, batch: int) -> dict:
    """One latency input of ``batch`` rows: ``SEQ`` tokens (LM: all attended) or 224x224 images."""
    import torch

    from slimformer.data.datasets import get_dataset

    if task == "image-features":
        return dict(get_dataset("fashion-mnist", "test", processor=folder, limit=batch).inputs)
    ds = get_dataset("nyt-editorials" if task == "causal-lm" else "vader-movie", "test",
                     tokenizer=folder)
    x = {}
    for k, v in ds.inputs.items():
        pad = torch.zeros(batch, SEQ, dtype=v.dtype)
        n = min(SEQ, v.shape[1])
        pad[:, :n] = v[:batch, :n]
        if k == "attention_mask" and task == "causal-lm":
            pad[:] = 1
        x[k] = pad
    return x
