"""Weight-only quantized Linears as ONNX Runtime's ``com.microsoft::MatMulNBits``, from our codes.

``to_matmul_nbits(proto, qmodel)`` rewrites a float ONNX graph of ``qmodel``'s own float model:
every ``MatMul`` whose weight input is a quantized Linear's float weight (found by value: the
constant ``(K, N)`` equals ``W.T`` of the Linear's ``(N, K)`` weight, directly or through a
``Transpose``; never by module name) becomes ``MatMulNBits(A, B, scales[, zero_points])``, and so
does a plain ``Gemm`` (a Linear on 2-D rows, e.g. a pooler: ``A @ W.T + C``, its bias ``C`` an
``Add`` after it):

    B            (N, k_blocks, block_size * bits / 8) uint8, our codes packed along K,
                 low bits first (two 4-bit codes per byte, the first in the low nibble)
    scales       (N, k_blocks) float32, our per-group scales
    zero_points  (N, ceil(k_blocks * bits / 8)) uint8, our zero points packed the same way;
                 left out when every one is 2^(bits-1) (symmetric grids: the op's default)

with ``K``, ``N``, ``bits``, ``block_size`` = our group size and ``accuracy_level``. The codes
are those of the model's inference form (:func:`~slimformer.quantize.inference.to_inference`):
nothing is re-quantized. A quantized embedding table's ``Gather`` becomes
``GatherBlockQuantized`` (uint8 codes packed along the row, ``gather_axis`` 0, ``quantize_axis``
1) the same way. A Linear (or table) with ranges per output channel (row) is written with the largest
block size in 128/64/32/16 dividing ``K``, its scale and zero point repeated per block (the same
values). Bits other than 2/4/8, groups below 16 or not a power of two and expert (3-D) weights
have no form here: :class:`ExportError` names them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.quantize.pack import pack_codes

NBITS = (2, 4, 8)
BLOCKS = (128, 64, 32, 16)
# accuracy_level 4: ONNX Runtime's int8 activation blocks. Measured on SmolLM2-135M (512 nyt
# tokens, int8 per block simulated on every Linear input): logits SQNR vs float 20.9 dB at 128,
# 28.4 at 64, 31.3 at 32, 33.3 at 16; next-token agreement 0.885 / 0.949 / 0.957 / 0.967
INT8_BLOCK = 32
DOMAIN = "com.microsoft"


@dataclass
class NbitsStats:
    """What the rewrite replaced: MatMulNBits nodes by (bits, block size), bytes saved."""

    replaced: int = 0
    by_form: dict[str, int] = field(default_factory=dict)  # "int4 g32": count
    float_bytes: int = 0  # the replaced float weights
    packed_bytes: int = 0  # B + scales + zero points written instead
    fused: int = 0  # groups of MatMulNBits reading one input merged into one (export.fusenbits)

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _key(a: np.ndarray) -> str:
    """A digest of a float32 ``(N, K)`` weight's values and shape."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.blake2b(a.tobytes() + str(a.shape).encode(), digest_size=16).hexdigest()


def check_supported(qmodel) -> None:
    """Fail fast (before any export): every quantized weight has a MatMulNBits / Gather form.

    Raises:
        ExportError: Bits other than 2/4/8, expert weights, or no block size (see module doc).
    """
    for q in [*qmodel.quant.linears.values(), *qmodel.quant.embeddings.values()]:
        if getattr(q, "axis", None) is not None:
            raise ExportError(f"{q.name}: batched (expert) weights have no MatMulNBits form; "
                              "keep them float (keep_float) for the ONNX export")
        if q.wq.bits not in NBITS:
            raise ExportError(f"{q.name}: {q.wq.bits}-bit weights have no MatMulNBits form; "
                              f"allowed: {', '.join(map(str, NBITS))} bits")
        k = q.param[0].shape[-1] if not hasattr(q, "full_matrix") else q.full_matrix().shape[1]
        group = getattr(q, "group", None)
        _block(q, k, k // group if group else 1)


def _codes(qmodel, inf) -> dict[str, tuple]:
    """``{digest of the float weight: (LinearQuant, codes (N, K), scale, zero (N, groups))}``."""
    float_lqs = {lq.name: lq for lq in qmodel.quant.linears.values()}
    out: dict[str, tuple] = {}
    for lq in inf.quant.linears.values():
        if lq.axis is not None:
            raise ExportError(f"{lq.name}: batched (expert) weights have no MatMulNBits form; "
                              "keep them float (keep_float) for the ONNX export")
        bits = lq.wq.bits
        if bits not in NBITS:
            raise ExportError(f"{lq.name}: {bits}-bit weights have no MatMulNBits form; "
                              f"allowed: {', '.join(map(str, NBITS))} bits")
        w = float_lqs[lq.name].full_matrix().detach().float()  # (N, K)
        n, k = w.shape
        rows = lq.int_weight.shape[0]
        codes = lq.int_weight.reshape(n, k)
        scale = lq.wq.scale.reshape(n, rows // n).float()
        zero = lq.wq.zero.reshape(n, rows // n).float()
        if not torch.equal(zero, zero.round()):
            raise ExportError(f"{lq.name}: zero points are not integers; MatMulNBits needs "
                              "integer zero points")
        key = _key(w.numpy())
        if key in out and not torch.equal(out[key][1], codes):
            raise ExportError(f"{lq.name} and {out[key][0].name} hold the same float weight but "
                              "different codes: the graph cannot tell their MatMuls apart")
        out[key] = (lq, codes, scale, zero)
    return out


def _tables(qmodel, inf) -> dict[str, tuple]:
    """``{digest of the float table: (EmbeddingQuant, codes (num, dim), scale, zero (num, 1))}``."""
    floats = {e.name: e for e in qmodel.quant.embeddings.values()}
    out = {}
    for eq in inf.quant.embeddings.values():
        if eq.wq.bits not in NBITS:
            raise ExportError(f"{eq.name}: a {eq.wq.bits}-bit embedding table has no "
                              f"GatherBlockQuantized form; allowed: {', '.join(map(str, NBITS))}")
        table = floats[eq.name].param[0].detach().float()
        out[_key(table.numpy())] = (eq, eq.int_weight, eq.wq.scale.float(), eq.wq.zero.float())
    return out


def _block(lq, k: int, groups: int) -> int:
    """The MatMulNBits block size of a Linear with ``groups`` ranges per row of ``k`` columns."""
    if groups == 1:  # per output channel: any block size dividing K repeats the same values
        size = next((b for b in BLOCKS if k % b == 0), None)
    else:
        size = k // groups
        size = size if size >= 16 and size & (size - 1) == 0 else None
    if size is None:
        raise ExportError(f"{lq.name}: {k} input columns in {groups} group(s) have no MatMulNBits "
                          "block size (a power of two >= 16 dividing K); allowed group sizes: "
                          f"{', '.join(map(str, BLOCKS))}")
    return size


def _initializers(lq, codes, scale, zero, block: int, prefix: str):
    """``(B, scales, zero_points or None)`` as TensorProtos named after ``prefix``."""
    from onnx import numpy_helper

    bits = lq.wq.bits
    n, k = codes.shape
    blocks = k // block
    reps = blocks // scale.shape[1]  # per-channel ranges: one scale repeated over the blocks
    scale, zero = scale.repeat_interleave(reps, 1), zero.repeat_interleave(reps, 1)
    packed = pack_codes(codes.reshape(n, blocks, block), bits).reshape(n, blocks,
                                                                       block * bits // 8)
    tensors = [numpy_helper.from_array(packed.numpy(), prefix + "_B"),
               numpy_helper.from_array(scale.numpy().astype(np.float32), prefix + "_scales")]
    if bool((zero != 2 ** (bits - 1)).any()):
        per_byte = 8 // bits
        pad = -blocks % per_byte
        zp = torch.cat([zero, zero.new_zeros(n, pad)], 1).to(torch.uint8)
        zp = pack_codes(zp, bits).reshape(n, (blocks + pad) * bits // 8)
        tensors.append(numpy_helper.from_array(zp.numpy(), prefix + "_zero_points"))
    return tensors


def to_matmul_nbits(proto, qmodel, accuracy_level: int = 0,
                    int8_block: int | None = INT8_BLOCK, fuse: bool = True) -> NbitsStats:
    """Rewrite ``proto`` (the float graph of ``qmodel.model``, in memory) in place; see module doc.

    At ``accuracy_level`` 4 ONNX Runtime quantizes each row of the activations to int8 per block
    of the op's ``block_size`` inputs: a group larger than ``int8_block`` is written as blocks of
    ``int8_block`` with its scale and zero point repeated (the same codes and values), so the
    activations' int8 ranges are that fine (None: the groups' own size). ``fuse``: merge the
    ops that read one input (:func:`~slimformer.export.fusenbits.fuse_shared_inputs`).

    Raises:
        ExportError: A quantized Linear with no MatMulNBits form, or whose MatMul is not in
            the graph.
    """
    from onnx import helper, numpy_helper

    from slimformer.quantize.inference import to_inference

    graph = proto.graph
    inf = qmodel if qmodel.inference else to_inference(qmodel)  # the codes
    sites = _codes(qmodel, inf)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    stats, found, forms = NbitsStats(), set(), Counter()
    new_nodes = []
    for node in graph.node:
        site, gemm = None, node.op_type == "Gemm" and node.domain in ("", "ai.onnx")
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            site = _weight_site(node.input[1], inits, producer, sites)
        elif gemm and _plain_gemm(node):
            site = _weight_site(node.input[1], inits, producer, sites, _attr(node, "transB", 0))
        if site is None:
            new_nodes.append(node)
            continue
        key, src_bytes = site
        lq, codes, scale, zero = sites[key]
        n, k = codes.shape
        block = _block(lq, k, scale.shape[1])
        if accuracy_level == 4 and int8_block and block > int8_block and block % int8_block == 0:
            block = int8_block
        prefix = f"{node.name or node.output[0]}_nbits"
        tensors = _initializers(lq, codes, scale, zero, block, prefix)
        graph.initializer.extend(tensors)
        bias = node.input[2] if gemm and len(node.input) > 2 and node.input[2] else ""
        out = [f"{prefix}_out"] if bias else list(node.output)
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in tensors)], out,
            name=prefix, domain=DOMAIN, K=k, N=n, bits=lq.wq.bits, block_size=block,
            accuracy_level=accuracy_level))
        if bias:  # Gemm's C (a broadcast bias): an Add after the MatMulNBits
            new_nodes.append(helper.make_node("Add", [out[0], bias], list(node.output),
                                              name=f"{prefix}_bias"))
        found.add(key)
        forms[f"int{lq.wq.bits} g{block}"] += 1
        stats.float_bytes += src_bytes
        stats.packed_bytes += sum(numpy_helper.to_array(t).nbytes for t in tensors)
    tables, gathered = _tables(qmodel, inf), set()
    new_nodes = _gathers(graph, new_nodes, tables, inits, gathered, forms, stats)
    missing = [sites[k][0].name for k in sites if k not in found]
    missing += [tables[k][0].name for k in tables if k not in gathered]
    if missing:
        raise ExportError(f"no MatMul / Gemm (Gather for a table) of the exported graph reads the float "
                          f"weight of {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                          ": those quantized weights cannot become MatMulNBits "
                          "(GatherBlockQuantized)")
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)
    if fuse:
        from slimformer.export.fusenbits import fuse_shared_inputs

        stats.fused = fuse_shared_inputs(graph)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    stats.replaced, stats.by_form = sum(forms.values()), dict(forms)
    return stats


def _gathers(graph, nodes, tables, inits, found, forms, stats) -> list:
    """``nodes`` with each Gather of a quantized table as ``GatherBlockQuantized`` (our codes)."""
    from onnx import helper, numpy_helper

    out = []
    for node in nodes:
        src = node.input[0] if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else ""
        a = numpy_helper.to_array(inits[src]) if src in inits else None
        key = _key(a) if a is not None and a.ndim == 2 and a.dtype == np.float32 else None
        axis = next((at.i for at in node.attribute if at.name == "axis"), 0)
        if key not in tables or axis != 0:
            out.append(node)
            continue
        eq, codes, scale, zero = tables[key]
        num, dim = codes.shape
        block = _block(eq, dim, 1)
        prefix = f"{node.name or node.output[0]}_gbq"
        tensors = _initializers(eq, codes, scale, zero, block, prefix)
        tensors[0] = numpy_helper.from_array(numpy_helper.to_array(tensors[0]).reshape(num, -1),
                                             tensors[0].name)  # (num, dim * bits / 8)
        graph.initializer.extend(tensors)
        names = [tensors[0].name, node.input[1], *(t.name for t in tensors[1:])]
        out.append(helper.make_node("GatherBlockQuantized", names, list(node.output),
                                    name=prefix, domain=DOMAIN, bits=eq.wq.bits,
                                    block_size=block, gather_axis=0, quantize_axis=1))
        found.add(key)
        forms[f"embedding int{eq.wq.bits} g{block}"] += 1
        stats.float_bytes += a.nbytes
        stats.packed_bytes += sum(numpy_helper.to_array(t).nbytes for t in tensors)
    return out


def _attr(node, name: str, default: float):
    """The int or float attribute ``name`` of ``node``, else ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def _plain_gemm(node) -> bool:
    """A Gemm that is ``A @ op(B) + C`` (alpha = beta = 1, A not transposed): a Linear on rows."""
    return (_attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
            and _attr(node, "transA", 0) == 0)


def _weight_site(name: str, inits, producer, sites, trans_b: int = 0) -> tuple[str, int] | None:
    """``(digest, float bytes)`` when ``name`` is a quantized Linear's weight.

    The weight reads as ``(K, N)``, or as ``(N, K)`` when ``trans_b`` (a Gemm with ``transB=1``).
    """
    from onnx import numpy_helper

    if name in inits and len(inits[name].dims) == 2:
        a = numpy_helper.to_array(inits[name])
        key = _key(a if trans_b else a.T)  # (N, K) = W, or (K, N) constant: W.T
    elif name in producer and producer[name].op_type == "Transpose" and not trans_b:
        src = producer[name].input[0]
        perm = [list(a.ints) for a in producer[name].attribute if a.name == "perm"]
        if src not in inits or len(inits[src].dims) != 2 or perm not in ([[1, 0]], []):
            return None
        a = numpy_helper.to_array(inits[src])
        key = _key(a)  # Transpose((N, K))
    else:
        return None
    return (key, a.nbytes) if a.dtype == np.float32 and key in sites else None


def _reads(graph) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs reads, and the graph outputs."""
    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                read |= _reads(g)
    return read


def _drop_unused(graph) -> None:
    """Remove the Transposes and initializers no longer read (the replaced float weights)."""
    read = _reads(graph)
    dead = [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in read]
    for n in dead:
        graph.node.remove(n)
    read = _reads(graph)
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
