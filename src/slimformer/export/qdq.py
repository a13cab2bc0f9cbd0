"""The QDQ form of a quantized model, as traced by the ONNX exporter.

:func:`qdq_view` turns a copy of a quantized model (inference form) into a plain module whose
forward emits the standard ONNX quantization ops, through PyTorch's ``quantized_decomposed`` ops
that ``torch.onnx`` translates one to one:

- every quantized embedding table (``embedding_bits``): ``uint8`` rows gathered, then
  ``(codes - zero) * scale`` with the row's scale and zero point (Gather, Cast, Sub, Mul);
- every quantized Linear: a ``uint8`` weight initializer ``(out, in)`` with per-output-channel
  ``DequantizeLinear`` (axis 0, scale and zero point per channel), its input through
  ``QuantizeLinear -> DequantizeLinear`` (per tensor, ``uint8``), then ``MatMul`` (+ ``Add`` bias).
  ONNX Runtime fuses ``DQ(x), DQ(W) -> MatMul`` into ``MatMulIntegerToFloat`` (integer GEMM);
- the inputs of both attention matmuls (q, k and v) likewise through per-tensor Q/DQ;
- activations of fewer than 8 bits: a ``Clip`` to the b-bit grid before the ``uint8`` Q/DQ;
- the reparameterization affine of a norm whose affine cannot be folded (``(x + shift) * inv_r``):
  ``Add`` and ``Mul`` with constant vectors before the Q/DQ;
- log2 (log-sqrt2) softmax quantization in standard ops, no custom domain::

      raw   = Round(-2 * Log(p / delta) / ln 2)          # log-sqrt2 code before clipping
      code  = Clip(raw, 0, 2^b - 1); flushed = raw >= 2^b
      shift = Where(flushed, 0, Pow(2, -Ceil(code / 2)))
      odd   = Mod(code, 2) (fmod)
      A V   = delta * (MatMul(Where(odd, 0, shift), V) + sqrt2 * MatMul(Where(odd, shift, 0), V))

  (for plain log2 codes ``raw = Round(-Log2(p / delta))`` and ``A V = delta * MatMul(2^-code, V)``);
  uniform probability quantization is a ``uint8`` Q/DQ with zero point 0.

Linears whose input quantizer is dynamic (``QuantConfig.act_dynamic``: ranges computed at run
time, per tensor or per token) become integer matmuls on codes computed in the graph
(``DynamicQuantizeLinear`` or ReduceMin/ReduceMax ... -> ``MatMulInteger`` -> ``Cast`` -> ``Mul``,
:mod:`slimformer.export.dynamic`); where such a quantizer feeds anything else (a convolution, a
batched weight) its fake quantization is written in float ops.

Symmetric quantizers (``QuantConfig.symmetric``: zero point ``2^(b-1)`` on the unsigned codes)
become ``int8`` Q/DQ with zero point 0, as TensorRT requires: weights and embedding tables as
``int8`` initializers ``code - 2^(b-1)``, activations as ``int8`` per-tensor Q/DQ (the Clip below
8 bits keeps ``[-2^(b-1), 2^(b-1) - 1]``), uniform probabilities as ``int8`` Q/DQ whose grid is
the non-negative half ``[0, 2^(b-1) - 1]``. The values are the simulated model's exactly.

A deployment form (:class:`~slimformer.export.targets.QdqForm`) may store the same values
otherwise, for the target's kernels: ``weights="int8"`` shifts every weight to ``int8``,
``"narrow"`` keeps 8-bit weights ``uint8`` (symmetric ones with zero point 128);
``activations="uint8"`` writes symmetric activation grids as ``uint8`` with zero point
``2^(b-1)``; ``float_attention`` leaves ``scaled_dot_product_attention`` in float (the exporter
writes the standard ``Attention`` op at opset 23).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimformer.quantize.intercept import QuantMode


def _ops():
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401

    return torch.ops.quantized_decomposed


def _qdq(x: torch.Tensor, scale: float, zero: int, bits: int, signed: bool = False) -> torch.Tensor:
    """Per-tensor Q/DQ of ``x`` on a ``bits``-bit grid (Clip first below 8 bits).

    ``uint8`` with zero point ``zero``; ``signed``: ``int8`` with zero point 0 for a symmetric
    grid given as unsigned codes with ``zero == 2^(bits-1)`` (same values).
    """
    qd = _ops()
    if bits < 8:
        x = torch.clamp(x, (0 - zero) * scale, (2**bits - 1 - zero) * scale)
    if signed:
        q = qd.quantize_per_tensor(x, scale, 0, -128, 127, torch.int8)
        return qd.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)
    q = qd.quantize_per_tensor(x, scale, zero, 0, 255, torch.uint8)
    return qd.dequantize_per_tensor(q, scale, zero, 0, 255, torch.uint8)


class _QdqWeight(nn.Module):
    """Integer codes and per-channel scale/zero of one quantized weight, as buffers.

    Matrices are stored transposed, ``(in, out)`` with DequantizeLinear on axis 1, so that the
    graph is ``DQ(W) -> MatMul`` with no Transpose between (which ONNX Runtime fuses); conv
    weights keep their shape with axis 0. Batched (expert) weights are stored as their matrix
    ``(in, E * out)`` too and reshaped back to the parameter's layout after DequantizeLinear
    (the model's own ``bmm`` / ``einsum`` / indexing then reads them: exact values, a float
    matmul in ONNX Runtime).
    """

    def __init__(self, lq, weights: str = "model"):
        super().__init__()
        self.axis = getattr(lq, "axis", None)
        self.shape = tuple(lq.param[0].shape)
        self.conv = lq.param[0].dim() > 2 and self.axis is None
        codes = lq.int_weight.reshape(lq.param[0].shape) if self.conv else lq.int_weight.t()
        zero = lq.wq.zero.reshape(-1).to(torch.int64)
        symmetric = getattr(lq.wq, "symmetric", False)
        # int8 storage ("model"): symmetric grids (zero point 0), and asymmetric grids of <= 7
        # bits, whose codes shifted by 2^(b-1) fit in [-64, 63]: ONNX Runtime's AVX2 u8 x s8
        # kernels cannot saturate on them (u8 x s8 pairs stay below 2^15), unlike full-range
        # int8; "int8" (VNNI/AMX: no saturation) shifts every grid, "narrow" only <= 7 bits
        if weights == "int8":
            self.signed = True
        elif weights == "narrow":
            self.signed = lq.wq.bits <= 7
        else:
            self.signed = symmetric or lq.wq.bits <= 7
        if self.signed:
            half = 2 ** (lq.wq.bits - 1)
            codes = (codes.to(torch.int16) - half).to(torch.int8)
            zero = torch.zeros_like(zero) if symmetric else zero - half
        self.register_buffer("codes", codes.contiguous().clone())
        self.register_buffer("scale", lq.wq.scale.reshape(-1).float().clone())
        self.register_buffer("zero", zero.clone())
        self.transposed = lq.transposed
        self.register_buffer("outlier_idx", None)  # (k,): input channels kept float
        self.register_buffer("outlier_w", None)  # (k, out): their dequantized weight rows
        self.register_buffer("split_codes", None)  # (in, out): codes, outlier rows at zero
        outliers = getattr(lq.act, "outliers", None)
        if outliers is not None and not lq.act.keep_float and not self.conv and self.axis is None:
            self.outlier_idx = outliers.clone()
            with torch.no_grad():
                self.outlier_w = self.matrix_t()[outliers].float().clone()
            split = self.codes.clone()  # those rows dequantize to exact zeros
            split[outliers] = self.zero.to(split.dtype).unsqueeze(0)
            self.split_codes = split

    def _dq(self, axis: int, codes: torch.Tensor | None = None) -> torch.Tensor:
        lo, hi, dtype = (-128, 127, torch.int8) if self.signed else (0, 255, torch.uint8)
        return _ops().dequantize_per_channel(self.codes if codes is None else codes, self.scale,
                                             self.zero, axis, lo, hi, dtype)

    def matrix_t(self) -> torch.Tensor:
        """The dequantized weight as ``(in, out)``."""
        return self._dq(1)

    def split_matrix_t(self) -> torch.Tensor:
        """``(in, out)`` dequantized, the outlier channels' rows zero (the integer MatMul's)."""
        return self._dq(1, self.split_codes)

    def float_part(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., O] @ W[O, :]``: the outlier channels' product in float (Gather, MatMul)."""
        return torch.matmul(x.index_select(-1, self.outlier_idx), self.outlier_w)

    def forward(self) -> torch.Tensor:
        """The dequantized weight in the model's own layout."""
        if self.conv:
            return self._dq(0)
        if self.axis is not None:  # (rows, in) -> the parameter's (..., in, ...)
            moved = self.shape[:self.axis] + self.shape[self.axis + 1:] + (self.shape[self.axis],)
            return self.matrix_t().t().reshape(moved).movedim(-1, self.axis)
        return self.matrix_t() if self.transposed else self.matrix_t().t()


class _QdqEmbedding(nn.Module):
    """A per-row quantized embedding table: ``uint8`` codes, scale and zero point per row.

    Symmetric tables: ``int8`` codes ``code - 2^(b-1)`` and zero point 0.
    """

    def __init__(self, eq):
        super().__init__()
        codes, zero = eq.int_weight, eq.wq.zero.reshape(-1).float()
        if getattr(eq.wq, "symmetric", False):
            codes = (codes.to(torch.int16) - 2 ** (eq.wq.bits - 1)).to(torch.int8)
            zero = torch.zeros_like(zero)
        self.register_buffer("codes", codes.clone())  # (num, dim)
        self.register_buffer("scale", eq.wq.scale.reshape(-1).float().clone())  # (num,)
        self.register_buffer("zero", zero.clone())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``(codes[ids] - zero[ids]) * scale[ids]``: Gather on uint8, then Cast/Sub/Mul."""
        return (self.codes[ids].float() - self.zero[ids].unsqueeze(-1)) * \
            self.scale[ids].unsqueeze(-1)  # (..., dim)


def _matmul(act, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``act(x) @ w``; a 2-D ``x`` gets a leading unit axis before its Q/DQ.

    Otherwise ONNX Runtime fuses MatMul + Add into a float Gemm before its QDQ fusion can make the
    MatMul an integer one; the axis goes before the Q/DQ so that DQ feeds the MatMul directly.
    """
    if x.dim() == 2:
        return torch.matmul(act(x.unsqueeze(0)), w).squeeze(0)
    return torch.matmul(act(x), w)


def _site_matmul(site, x: torch.Tensor) -> torch.Tensor:
    """``x (..., in) @ W (in, out)`` of a quantized Linear site in its export form (no bias).

    Run-time input ranges: the integer matmul on codes computed in the graph; outlier channels:
    the integer MatMul (their weight rows at zero) plus their float product; else Q/DQ operands.
    """
    if getattr(site, "int_matmul", None) is not None:
        return site.int_matmul(site.act.transform(x))
    if site.weight.outlier_idx is not None:
        return _matmul(site.act.grid_part, x, site.weight.split_matrix_t()) + \
            site.weight.float_part(x)
    return _matmul(site.act_in, x, site.weight.matrix_t())


class _QdqMode(QuantMode):
    """:class:`QuantMode` whose linear sites are ``MatMul`` (not ``Gemm``) of Q/DQ operands.

    ONNX Runtime fuses ``DQ -> MatMul`` into an integer matmul but not ``DQ -> Gemm``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "linear":
            site = self.q.linear_site(args[1] if len(args) > 1 else kwargs.get("weight"))
            if site is not None:
                x = args[0] if args else kwargs["input"]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                y = _site_matmul(site, x)
                return y if b is None else y + b
        elif getattr(func, "__name__", "") == "embedding" and len(args) >= 2:
            site = self.q.embedding_site(args[1])
            if site is not None:
                return site.table.lookup(args[0])
        elif getattr(func, "__name__", "") == "addmm" and len(args) >= 3 and not kwargs:
            site = self.q.linear_site(args[2])  # GPT-2 Conv1D: addmm(bias, x, W (in, out))
            if site is not None:
                return _site_matmul(site, args[1]) + args[0]
        return super().__torch_function__(func, types, args, kwargs)


class _FloatAttentionQdqMode(_QdqMode):
    """:class:`_QdqMode` that leaves ``scaled_dot_product_attention`` to the exporter (float)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


class QdqModel(nn.Module):
    """A quantized model whose forward emits ONNX Q/DQ ops (see module doc); for export only."""

    def __init__(self, qmodel, form=None):
        super().__init__()
        from slimformer.quantize.act import ActQuantizer, ProbQuantizer

        weights = form.weights if form is not None else "model"
        signed_acts = form is None or form.activations == "model"
        # attention in float: the target asks for it, or no attention site is quantized; then
        # the exporter writes the attention (opset 23: one Attention op; below: its own
        # decomposition, which OpenVINO fuses) instead of our explicit masked softmax
        self.float_attention = bool(form is not None and form.float_attention) or (
            bool(qmodel.quant.attention) and not qmodel.quant.quantized_attention)

        _ops()  # register the ops before the exporter builds its op table
        self.qmodel = copy.deepcopy(qmodel)
        self.qmodel._rebind()
        q = self.qmodel.quant
        self.weights = nn.ModuleDict({k: _QdqWeight(lq, weights) for k, lq in q.linears.items()})
        for k, lq in q.linears.items():
            # an instance attribute (not a submodule) shadowing LinearQuant.weight()
            object.__setattr__(lq, "weight", self.weights[k])
        self.int_matmuls = nn.ModuleDict(_int_matmuls(q, self.weights))
        for k, im in self.int_matmuls.items():
            object.__setattr__(q.linears[k], "int_matmul", im)
        self.tables = nn.ModuleDict({k: _QdqEmbedding(e) for k, e in q.embeddings.items()})
        for k, e in q.embeddings.items():
            object.__setattr__(e, "table", self.tables[k])
        keeps = {id(lq.act): lq.act.keep_mask(lq.matrix().shape[1]) for lq in q.linears.values()
                 if lq.act.outliers is not None}  # keep masks (C,) of outlier sites
        for m in q.modules():
            if isinstance(m, ActQuantizer) and not m.keep_float and m.dynamic is None:
                # kept float: no Q/DQ; dynamic: its own forward, float ops (non-Linear users)
                s, z = m.scale_zero()
                signed = signed_acts and getattr(m, "symmetric", False)
                keep = keeps.get(id(m))
                m.forward = _act_forward(m, float(s), int(z), signed, keep)
                if keep is not None:  # the quantized channels alone (outliers zeroed)
                    m.grid_part = _grid_part(m, float(s), int(z), signed)
            elif isinstance(m, ProbQuantizer) and m.kind == "uniform" and m.mode == "quant":
                m.forward = _uniform_probs(float(m.delta), m.bits, getattr(m, "symmetric", False),
                                           signed_acts)
        self.qmodel._rebind(_FloatAttentionQdqMode if self.float_attention else _QdqMode)

    def forward(self, *args, **kwargs):
        """Run the model with Q/DQ ops; parameters are looked up again (export swaps them)."""
        q, model = self.qmodel.quant, self.qmodel.model
        q.by_id = {id(model.get_parameter(lq.name)): lq for lq in q.linears.values()}
        q.emb_by_id = {id(model.get_parameter(e.name)): e for e in q.embeddings.values()}
        q.param_ids = {id(p) for p in model.parameters()}
        with self.qmodel._mode:
            return model(*args, **kwargs)


def _int_matmuls(q, weights: nn.ModuleDict) -> dict:
    """:class:`~slimformer.export.dynamic.IntMatmul` of every plain Linear with a dynamic input."""
    out = {}
    for k, lq in q.linears.items():
        act, w = lq.act, weights[k]
        if act.dynamic is not None and not act.keep_float and not w.conv and w.axis is None:
            from slimformer.export.dynamic import IntMatmul

            out[k] = IntMatmul(w, act.bits, act.dynamic == "token",
                               act.keep_mask(w.codes.shape[0]))
    return out


def _act_forward(act, scale: float, zero: int, signed: bool, keep: torch.Tensor | None = None):
    """Q/DQ of the input; ``keep (C,)``: outlier channels (0) zeroed before it, added back after."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        t = act.transform(x)
        if keep is None:
            return _qdq(t, scale, zero, act.bits, signed)
        return _qdq(t * keep, scale, zero, act.bits, signed) + t * (1 - keep)

    return forward


def _grid_part(act, scale: float, zero: int, signed: bool):
    """Q/DQ of the whole input for the integer MatMul whose outlier rows are zero.

    The outlier channels clip to the grid's ends there and multiply zero weights: no masking op.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _qdq(act.transform(x), scale, zero, act.bits, signed)

    return forward


def _uniform_probs(delta: float, bits: int, symmetric: bool, signed: bool = True):
    """Uniform probabilities on [0, delta]: uint8 (2^b - 1 steps) or int8 (2^(b-1) - 1 steps).

    A symmetric grid (2^(b-1) - 1 steps) with ``signed=False`` is written as uint8, zero point 0.
    """
    if symmetric and not signed:
        scale = delta / (2 ** (bits - 1) - 1)

        def forward(p: torch.Tensor) -> torch.Tensor:
            return _qdq(p, scale, 0, bits - 1)  # Clip to [0, 2^(b-1) - 1] steps, then uint8

        return forward
    if symmetric:
        scale = delta / (2 ** (bits - 1) - 1)

        def forward(p: torch.Tensor) -> torch.Tensor:
            return _qdq(p, scale, 0, bits - 1 if bits < 8 else 8, signed=True)  # Clip below 8
    else:
        scale = delta / (2**bits - 1)

        def forward(p: torch.Tensor) -> torch.Tensor:
            return _qdq(p, scale, 0, bits)

    return forward
