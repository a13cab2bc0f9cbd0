"""A rotation of the residual stream folded into the weights (QuaRot / SpinQuant's ``R1``).

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs" (2024); Liu et al.,
"SpinQuant" (2024). In a pre-norm model whose norms are RMSNorms, the residual stream ``x (.., H)``
is only read through RMSNorms (scale-invariant: ``rms(x R) = rms(x)`` for an orthogonal ``R``)
feeding Linears, and only written by embedding tables and Linears. With every norm gain folded
into the Linears that read it (their columns times the gain, the gain then 1), ``x -> x R`` is
exact: the tables become ``E R``, the Linears reading a norm ``W R``, the Linears writing the
stream ``R^T W`` (bias ``b R``). The float model computes the same function; its weights are
*incoherent*: a few large input columns are spread over all of them, so a per-group INT4 grid
wastes fewer codes (SmolLM2-135M INT4 g128 GPTQ, docs/quantize.md: perplexity 46.00 -> 45.21 on
128 calibration rows, 46.05 -> 44.80 on 512).

Found from the structure map, never by names: the norms (``rmsnorm``, every consumer a Linear,
no shift, one width ``H``), their Linears (readers), the other 2-D Linears producing ``H``
features (writers), and the ``nn.Embedding`` tables of width ``H``. A reader sharing its weight
with a table (a head tied to the embedding) is untied first (its own copy: the table rotates as
``E R``, the head folds the final norm's gain). The rotated model is checked against the model
before on the probe rows (:data:`MIN_DB`): anything the plan missed (a learned position vector
added to the stream, a norm read by something else) shows there, and the caller restores the
model.

``R`` is a seeded random orthogonal matrix (QR of a Gaussian, signs fixed), computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MIN_DB = 50.0  # output SQNR of the rotated float model vs before, else the rotation is undone


@dataclass
class Plan:
    """What a residual rotation changes: parameter names, the stream width ``H``."""

    width: int
    norms: list  # (NormSite, its readers' weight names): RMSNorms read by Linears only
    readers: list[str]  # Linear weight names reading a norm (columns x gain, then W R)
    writers: list[str]  # Linear weight names producing H features (R^T W, bias b R)
    tables: list[str]  # nn.Embedding module paths of width H (E R)


def plan(model: nn.Module, structure) -> tuple[Plan | None, str]:
    """The rotation of ``model`` (None and why not when its structure does not allow one)."""
    norms = list(structure.norms)
    if not norms:
        return None, "no norm feeds a Linear"
    kinds = {n.kind for n in norms}
    if kinds != {"rmsnorm"}:
        return None, (f"norms of kind {', '.join(sorted(kinds))}: only RMSNorms are "
                      "rotation-invariant (a LayerNorm subtracts the mean)")
    widths = {n.dim for n in norms}
    if len(widths) != 1:
        return None, f"norms of several widths {sorted(widths)}"
    bad = [n.module for n in norms if not n.foldable or n.bias]
    if bad:
        return None, (f"{bad[0]} (and {len(bad) - 1} more) also feeds a non-Linear op or has a "
                      "shift: its gain cannot be folded (a post-norm model)")
    h = widths.pop()
    # a weight shared with a table (a tied head) is named by its Linear's own path
    tables = [name for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and m.embedding_dim == h]
    linear_names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear):
            linear_names.setdefault(id(m.weight), f"{name}.weight" if name else "weight")
    norms = [(n, [linear_names.get(id(model.get_parameter(w)), w) for w in n.linears])
             for n in norms]
    readers = sorted({w for _, ws in norms for w in ws})
    if sum(len(ws) for _, ws in norms) != len(readers):
        return None, "a Linear reads several norms (their gains cannot all be folded into it)"
    table_ids = {id(model.get_submodule(t).weight) for t in tables}
    own = set(linear_names.values())
    for w in readers:
        p = model.get_parameter(w)
        if w not in own and id(p) in table_ids:
            return None, (f"{w} is an embedding table the model multiplies by directly (a head "
                          "without a Linear module of its own)")
        if p.dim() != 2 or p.shape[1] != h:
            return None, f"{w} reads a norm but is not a ({h}-input) Linear weight"
    reader_ids = {id(model.get_parameter(w)) for w in readers}
    writers = []
    for ref in structure.linears:
        p = model.get_parameter(ref.weight)
        if id(p) in reader_ids or ref.out_features != h:
            continue
        if id(p) not in linear_names or p.dim() != 2 or ref.calls != 1:
            return None, (f"{ref.weight} produces {h} features but is not a plain nn.Linear "
                          "called once per forward")
        writers.append(linear_names[id(p)])
    if not writers:
        return None, "no Linear writes the residual stream"
    if not tables:
        return None, f"no embedding table of width {h} starts the residual stream"
    return Plan(h, norms, readers, writers, tables), ""


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal ``(n, n)`` matrix (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed


def _untie(model: nn.Module, names: list[str]) -> list[str]:
    """Give each of ``names`` its own copy where the parameter is shared with another name."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    untied = []
    for name in names:
        p = model.get_parameter(name)
        if len(owners[id(p)]) > 1:
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr,
                    nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            untied.append(name)
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # a Hugging Face model would tie them again on save
    return untied


def untie_readers(model: nn.Module, structure) -> list[str]:
    """Untie the readers of a rotatable ``model`` as :func:`rotate` did (a saved rotated model)."""
    p, _ = plan(model, structure)
    return _untie(model, p.readers) if p is not None else []


@torch.no_grad()
def rotate(model: nn.Module, p: Plan, seed: int) -> list[str]:
    """Fold the norm gains and the rotation of :func:`plan` into ``model``; returns notes."""
    untied = _untie(model, p.readers)
    for n, linears in p.norms:
        if not n.weight:
            continue
        gain = model.get_parameter(n.weight)
        g = gain.detach().double() + n.gain_offset  # (H,)
        for w in linears:
            lin = model.get_parameter(w)
            lin.copy_((lin.double() * g).to(lin.dtype))
        gain.fill_(1.0 - n.gain_offset)
    r = orthogonal(p.width, seed)
    for t in p.tables:
        e = model.get_submodule(t).weight
        e.copy_((e.double() @ r).to(e.dtype))
    for w in p.readers:
        lin = model.get_parameter(w)
        lin.copy_((lin.double() @ r).to(lin.dtype))
    for w in p.writers:
        lin = model.get_parameter(w)
        lin.copy_((r.T @ lin.double()).to(lin.dtype))
        bias = getattr(model.get_submodule(w.rpartition(".")[0]), "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.double() @ r).to(bias.dtype))
    notes = [f"residual stream rotated (QuaRot/SpinQuant R1, seed {seed}): width {p.width}, "
             f"{len(p.norms)} RMSNorm gain(s) folded into {len(p.readers)} Linear(s), "
             f"{len(p.writers)} writing Linear(s), {len(p.tables)} embedding table(s)"]
    if untied:
        notes.append(f"untied from the embedding table to fold its norm gain: {', '.join(untied)}")
    return notes


@torch.no_grad()
def rotate_checked(model: nn.Module, structure, inputs: dict, seed: int) -> tuple[str, list[str]]:
    """:func:`rotate` ``model`` if its structure allows, checked on ``inputs``.

    Returns ``(status, notes)``: ``applied``; ``not applicable`` (the model is unchanged); or
    ``failed``: it was rotated and its outputs moved by more than :data:`MIN_DB` allows, so the
    caller must restore the model (it is left rotated). The notes say which and why.
    """
    import math

    from slimformer.models.outputs import leaves, normalized_mse, seeded_forward

    p, why = plan(model, structure)
    if p is None:
        return "not applicable", [f"residual rotation not applicable: {why}"]
    model.eval()
    before = leaves(seeded_forward(model, inputs))
    notes = rotate(model, p, seed)
    after = leaves(seeded_forward(model, inputs))
    err = float(normalized_mse(after, before))
    db = 10 * math.log10(1 / max(err, 1e-30))
    if db < MIN_DB:
        return "failed", [f"residual rotation undone: the rotated float model's outputs are "
                       f"{db:.1f} dB from the model's (at least {MIN_DB:.0f} expected): something "
                       "outside the norms and Linears reads or writes the stream"]
    notes[0] += f"; float outputs unchanged ({min(db, 300):.0f} dB)"
    return "applied", notes
