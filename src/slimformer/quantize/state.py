"""The quantized model: a wrapper holding the float model and all quantizers.

``QuantizedModel(model, qstate)`` runs ``model`` inside :class:`~.intercept.QuantMode`, so every
quantizer is applied where the structure map says, with no change to the model's own code.
"""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from slimformer.errors import ConfigError, UnsupportedModelError
from slimformer.quantize.act import ActQuantizer, ProbQuantizer
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.intercept import QuantMode
from slimformer.quantize.quantizers import WeightQuantizer, fake_uniform


def shared_params(model: nn.Module) -> set[int]:
    """``id`` of every parameter the model holds under more than one name (tied weights).

    E.g. an LM head tied to its embedding table: a fold into one use would change the others.
    """
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def key_of(name: str) -> str:
    """A ModuleDict-safe key for a dotted name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class LinearQuant(nn.Module):
    """Quantization of one linear map: its weight (per output channel) and its input.

    ``transposed`` weights are stored ``(in, out)`` (GPT-2 Conv1D). Conv weights are quantized
    per output channel over their flattened ``(out, in * k)`` view. Batched weights of 3+ axes
    (experts ``(E, out, in)``) give ``axis``, the axis their matmul contracts: they are quantized
    per slice along it, i.e. per (expert, output channel), as the matrix ``(E * out, in)``.
    """

    def __init__(self, name: str, param: nn.Parameter, act: ActQuantizer, bits: int,
                 transposed: bool, axis: int | None = None):
        super().__init__()
        self.name, self.transposed, self.axis = name, transposed, axis
        self.param = [param]  # not a submodule/parameter of ours: the model owns it
        self.act = act
        self.wq = WeightQuantizer(bits)
        self.register_buffer("int_weight", None)  # inference form: integer codes
        self.register_buffer("alpha", None)  # learned rounding (repquant): soft-rounding logits
        self.mode = "float"
        self.group: int | None = None  # weight-only: input columns per (scale, zero point)
        self._cache = None

    def matrix(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the rows its ranges are per.

        ``(out, in)``; with :attr:`group` (weight-only groups) ``(out * in / group, group)``,
        each row one group.
        """
        m = self.full_matrix(w)
        return m if self.group is None else m.reshape(-1, self.group)

    def full_matrix(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as ``(out, in)``."""
        w = self.param[0] if w is None else w
        if self.axis is not None:  # (..., in, ...) -> (rows, in)
            return w.movedim(self.axis, -1).reshape(-1, w.shape[self.axis])
        return w.t() if self.transposed else w.reshape(w.shape[0], -1)

    def _unmatrix(self, m: torch.Tensor) -> torch.Tensor:
        w = self.param[0]
        if self.group is not None:
            m = m.reshape(self.full_matrix().shape)
        if self.axis is not None:
            return m.reshape(w.movedim(self.axis, -1).shape).movedim(-1, self.axis)
        return m.t() if self.transposed else m.reshape(w.shape)

    def quantized_matrix(self) -> torch.Tensor:
        """Fake-quantized ``(out, in)`` weight (learned rounding if present)."""
        m = self.matrix()
        if self.int_weight is not None:
            return (self.int_weight.float() - self.wq.zero) * self.wq.scale
        if self.alpha is not None:
            return self.wq.scale * (torch.clamp(torch.floor(m / self.wq.scale) + soft_round(
                self.alpha) + self.wq.zero, 0, 2**self.wq.bits - 1) - self.wq.zero)
        return fake_uniform(m, self.wq.scale, self.wq.zero, self.wq.bits)

    def weight(self) -> torch.Tensor:
        """The weight as the model's op expects it: float, or fake-quantized (cached)."""
        if self.mode != "quant":
            return self.param[0]
        if self._cache is None or torch.is_grad_enabled():
            w = self._unmatrix(self.quantized_matrix())
            if torch.is_grad_enabled():
                return w
            self._cache = w
        return self._cache

    def act_in(self, x: torch.Tensor) -> torch.Tensor:
        """The input, observed or quantized by the shared activation quantizer."""
        return self.act(x)


class EmbeddingQuant(nn.Module):
    """Weight-only quantization of one embedding table ``(num, dim)``, per row."""

    def __init__(self, name: str, param: nn.Parameter, bits: int):
        super().__init__()
        self.name = name
        self.param = [param]  # the model owns it
        self.wq = WeightQuantizer(bits)
        self.register_buffer("int_weight", None)  # inference form: integer codes
        self.mode = "float"
        self._cache = None

    @torch.no_grad()
    def calibrate(self) -> None:
        """Per-row scale/zero from the table itself (range search, no data needed)."""
        self.wq.calibrate(self.param[0].detach(), search=True)

    def weight(self) -> torch.Tensor:
        """The table: float, or fake-quantized / dequantized codes (cached)."""
        if self.mode != "quant":
            return self.param[0]
        if self._cache is None:
            if self.int_weight is not None:
                self._cache = (self.int_weight.float() - self.wq.zero) * self.wq.scale
            else:
                self._cache = fake_uniform(self.param[0].detach(), self.wq.scale, self.wq.zero,
                                           self.wq.bits)
        return self._cache


def soft_round(alpha: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(alpha) in [0, 1]."""
    return torch.clamp(torch.sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)


class AttentionQuant(nn.Module):
    """Quantizers of one attention site: q and k (QK^T inputs), v (PV input), probabilities."""

    def __init__(self, module: str, bits: int, softmax: str):
        super().__init__()
        self.module = module
        self.q_in = ActQuantizer(f"{module}:q", bits)
        self.k_in = ActQuantizer(f"{module}:k", bits)
        self.v_in = ActQuantizer(f"{module}:v", bits)
        self.probs = ProbQuantizer(f"{module}:probs", bits, softmax if softmax != "none" else
                                   "uniform")
        self.probs_float = softmax == "none"
        self.inference = False  # set by to_inference: A V from log-sqrt2 codes
        self._last = None

    @property
    def is_float(self) -> bool:
        """Whether nothing of this site is quantized (q, k, v kept float, probabilities float)."""
        return self.probs_float and all(a.keep_float for a in (self.q_in, self.k_in, self.v_in))

    def quant_probs(self, p: torch.Tensor) -> torch.Tensor:
        """Quantized probabilities; in inference form also keeps their codes for :meth:`pv`."""
        pq = self.probs(p)
        self._last = None
        if self.inference and self.probs.kind == "log_sqrt2" and self.probs.mode == "quant":
            from slimformer.quantize.quantizers import log_sqrt2_codes

            self._last = (pq, *log_sqrt2_codes(p, self.probs.delta, self.probs.bits))
        return pq

    def pv(self, probs: torch.Tensor, v: torch.Tensor, matmul) -> torch.Tensor:
        """``probs @ v`` with v quantized; log2 two-scale form in inference (see inference.py)."""
        vq = self.v_in(v)
        if self._last is not None and probs is self._last[0]:
            from slimformer.quantize.quantizers import log2_two_scale_pv

            _, codes, flushed = self._last
            return log2_two_scale_pv(codes, flushed, self.probs.delta, vq, matmul)
        return matmul(probs, vq)


class QuantState(nn.Module):
    """All quantizers of a model, indexed for :class:`QuantMode`."""

    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleDict()
        self.acts = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        self.embeddings = nn.ModuleDict()
        self.by_id: dict[int, LinearQuant] = {}
        self.emb_by_id: dict[int, EmbeddingQuant] = {}
        self.param_ids: set[int] = set()
        self.has_mha = False
        self.notes: list[str] = []
        # values computed from a quantized weight in this forward (an expert ``W[e]``, ``W.t()``):
        # id -> (the value, kept alive while its id is in use; its LinearQuant)
        self.views: dict[int, tuple[torch.Tensor, LinearQuant]] = {}
        self.coverage = None  # WeightCoverage, set by build()
        self.weight_only = False  # activation quantizers stay float in every mode

    def linear_site(self, w) -> LinearQuant | None:
        """The :class:`LinearQuant` whose parameter is ``w`` (by identity)."""
        return self.by_id.get(id(w)) if isinstance(w, torch.Tensor) else None

    def embedding_site(self, w) -> EmbeddingQuant | None:
        """The :class:`EmbeddingQuant` whose table is ``w`` (by identity)."""
        return self.emb_by_id.get(id(w)) if isinstance(w, torch.Tensor) else None

    @property
    def quantized_attention(self) -> bool:
        """Whether some attention site quantizes anything (q, k, v or the probabilities)."""
        return any(not a.is_float for a in self.attention.values())

    def is_param(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is one of the model's parameters."""
        return id(t) in self.param_ids

    def forget(self) -> None:
        """Drop every quantizer's calibration observations (the ranges stay)."""
        for m in self.modules():
            if isinstance(m, (ActQuantizer, ProbQuantizer)):
                m.forget()

    def set_mode(self, mode: str) -> None:
        """Put every quantizer in ``mode`` (float / observe / quant)."""
        for m in self.modules():
            if isinstance(m, (ActQuantizer, ProbQuantizer, LinearQuant, EmbeddingQuant)):
                m.mode = "float" if self.weight_only and isinstance(m, ActQuantizer) else mode
                if isinstance(m, (LinearQuant, EmbeddingQuant)):
                    m._cache = None
        for a in self.attention.values():
            if a.probs_float:
                a.probs.mode = "float"


class QuantizedModel(nn.Module):
    """A model with quantizers applied during its forward: ``forward(**inputs)`` as the model."""

    def __init__(self, model: nn.Module, qstate: QuantState, config: QuantConfig):
        super().__init__()
        self.model, self.quant, self.config = model, qstate, config
        self.inference = False
        self._rebind()

    def _rebind(self, mode_cls: type[QuantMode] = QuantMode) -> None:
        """(Re)create the mode (a :class:`QuantMode` subclass) and the attention hooks.

        Needed after ``copy.deepcopy`` and when parameters were swapped (e.g. by an exporter).
        """
        q = self.quant
        q.by_id = {id(self.model.get_parameter(lq.name)): lq for lq in q.linears.values()}
        q.emb_by_id = {id(self.model.get_parameter(e.name)): e for e in q.embeddings.values()}
        q.param_ids = {id(p) for p in self.model.parameters()}
        self._mode = mode_cls(q)
        self.release()
        mode = self._mode
        for a in q.attention.values():
            def enter(mod, args, a=a):
                mode.attn, mode.after_softmax = a, False

            def leave(mod, args, out):
                mode.attn = None

            enter._slimformer = leave._slimformer = True
            mod = self.model.get_submodule(a.module)
            mod.register_forward_pre_hook(enter)
            mod.register_forward_hook(leave)

    def release(self) -> None:
        """Take the attention hooks off the wrapped model.

        The hooks hold this model's quantizers (their observations, weight caches): a model
        wrapped again, or kept after its quantized form is dropped, no longer keeps them alive.
        """
        for mod in self.model.modules():
            for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
                for k in [k for k, h in hooks.items() if getattr(h, "_slimformer", False)]:
                    del hooks[k]

    @property
    def input_shape(self):
        """The wrapped model's sample shape, when it declares one."""
        return getattr(self.model, "input_shape", None)

    def forward(self, *args, **kwargs):
        """Run the model with its quantizers."""
        with self._mode:
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's own ``generate`` (a Hugging Face causal LM), quantized.

        Every forward it makes (the prefill and each KV-cache decode step) runs with the
        quantizers: with static ranges, and per-token ranges (``act_dynamic: token``), a
        one-token step quantizes as the full sequence; per-tensor ranges
        (``act_dynamic: tensor``) span only the tokens of each step.

        Raises:
            UnsupportedModelError: The wrapped model has no ``generate`` (not a generative model).
        """
        gen = getattr(self.model, "generate", None)
        if not callable(gen):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no generate(): only a causal language model "
                "(a Hugging Face *ForCausalLM / *LMHeadModel) generates text")
        with self._mode:  # generate calls the wrapped model itself, not this wrapper
            return gen(*args, **kwargs)


def match_override(name: str, config: QuantConfig) -> tuple[int, int]:
    """(weight_bits, act_bits) of a Linear weight name after the ordered overrides."""
    for o in config.overrides:
        if fnmatch.fnmatchcase(name, o.pattern):
            return o.weight_bits or config.weight_bits, o.act_bits or config.act_bits
    return config.weight_bits, config.act_bits


def check_patterns(names: list[str], config: QuantConfig) -> None:
    """Every override and keep_float pattern must match at least one Linear."""
    problems = []
    for i, o in enumerate(config.overrides):
        if not any(fnmatch.fnmatchcase(n, o.pattern) for n in names):
            problems.append(f"overrides[{i}].pattern: {o.pattern!r} matches no Linear weight")
    for i, p in enumerate(config.keep_float):
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            problems.append(f"keep_float[{i}]: {p!r} matches no Linear weight")
    if problems:
        examples = ", ".join(names[:4])
        raise ConfigError([*problems, f"(Linear weights look like: {examples} ...)"],
                          "quantize config")
