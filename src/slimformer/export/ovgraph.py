"""Graph passes on an ``openvino.Model`` read from our ONNX files, before the CPU plugin compiles it.

Two forms the CPU plugin's own fusions look for and our ONNX files do not give by themselves:

- :func:`compact_zero_points`: ONNX packs ``MatMulNBits`` zero points two per byte, padded to
  an even number of groups, and OpenVINO's ONNX frontend reads them as ``Slice(Convert(u4))``.
  The plugin folds that slice into an f32 zero-point constant, and its compressed
  ``FullyConnected`` then decompresses with f32 zero points (SmolLM2-135M INT4: 1.4x the GEMM
  time and 1.5x the prefill of the same weights with u4 zero points). The pass slices the integer
  constant itself, so the zero points stay u4.
- :func:`float_masks`: boolean attention masks as additive f32 ones (the fused attention
  kernel's fast path).
- :func:`make_stateful`: a decoder graph's ``past_key_values.{i}`` inputs and ``present.{i}``
  outputs become state variables kept inside the infer request, the way OpenVINO's
  LLM pipelines build them: each ``ReadValue`` has an initial value (an empty cache of the
  step's batch) and is reordered by a ``beam_idx`` input (``Gather`` on the batch axis). Only in
  that form does the plugin's ``StatefulSDPAFusion`` turn ``ReadValue -> Concat ->
  ScaledDotProductAttention -> Assign`` into its attention-with-KV-cache kernel, which appends
  new keys in place instead of concatenating the whole cache every step (the plain
  make-stateful transformation leaves the ``Concat`` and a decomposed attention).
"""

from __future__ import annotations

import re

import numpy as np

from slimformer.errors import ExportError

PAST = re.compile(r"past_key_values\.\d+\.(key|value)")
BEAM_IDX = "beam_idx"


def _name(port) -> str:
    names = port.get_names()
    return sorted(names)[0] if names else ""


def compact_zero_points(model) -> int:
    """Slice integer constants under ``Slice(Convert(int constant))``; returns how many.

    Each such ``Slice`` (constant bounds) becomes ``Convert(sliced integer constant)``: the same
    values, the integer type kept where the plugin's weight-decompression patterns read it.
    """
    import openvino as ov
    import openvino.opset13 as ops

    ints = {ov.Type.u4: np.uint8, ov.Type.u8: np.uint8, ov.Type.i4: np.int8, ov.Type.i8: np.int8}
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Slice":
            continue
        cvt = op.input_value(0).get_node()
        if cvt.get_type_name() != "Convert":
            continue
        const = cvt.input_value(0).get_node()
        bounds = [op.input_value(i).get_node() for i in range(1, op.get_input_size())]
        etype = const.get_output_element_type(0)
        if (const.get_type_name() != "Constant" or etype not in ints
                or any(b.get_type_name() != "Constant" for b in bounds)):
            continue
        vals = np.asarray(const.get_vector(), np.int64).reshape(list(const.get_output_shape(0)))
        start, stop, step = (b.get_vector() for b in bounds[:3])
        axes = bounds[3].get_vector() if len(bounds) > 3 else range(len(start))
        index = [slice(None)] * vals.ndim
        for a, s, e, st in zip(axes, start, stop, step, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        new = ops.convert(ops.constant(vals[tuple(index)].astype(ints[etype]), dtype=etype),
                          cvt.get_output_element_type(0))
        op.output(0).replace(new.output(0))
        done += 1
    return done


def float_masks(model) -> int:
    """Boolean ``ScaledDotProductAttention`` masks as additive f32 ones; returns how many.

    ``Select(mask, 0, -inf)`` once per mask tensor: the op's own meaning of a boolean mask. The
    plugin's attention-with-cache kernel takes a boolean mask through a slow path (SmolLM2's
    shapes, 512-token prefill: 35 vs 9 ms per layer on 2 cores).
    """
    import openvino as ov
    import openvino.opset13 as ops

    done, made = 0, {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention" or op.get_input_size() < 4:
            continue
        mask = op.input_value(3)
        if mask.get_element_type() != ov.Type.boolean:
            continue
        if mask not in made:  # one Select per mask tensor (outputs compare by node and port)
            made[mask] = ops.select(mask, ops.constant(np.float32(0)),
                                    ops.constant(np.float32(-np.inf))).output(0)
        op.input(3).replace_source_output(made[mask])
        done += 1
    return done


def make_stateful(model, reorder: bool = True) -> list[str]:
    """Keep a decoder graph's cache inside the infer request; returns the past input names.

    Every ``past_key_values.{i}.key|value`` input ``(B, kv_heads, P, head_dim)`` becomes a
    variable of that name read by ``ReadValue`` (initial value: an empty ``(B, kv_heads, 0,
    head_dim)`` cache, ``B`` from ``input_ids``); with ``reorder`` it is reordered by the new
    input ``beam_idx (B,)`` int32 (feed ``arange(B)`` to keep each row's own cache), the form
    the plugin fuses. Its ``present.{i}...`` output is written back by ``Assign`` and leaves the
    outputs. A request's ``reset_state()`` starts a new sequence. ``reorder=False`` where the
    attention's query rows are not the new cache rows (the ``fold`` form): the fused kernel
    would size the cache from the query.

    Raises:
        ExportError: no past inputs, no ``input_ids``, a past input without its present output,
            or a past input whose head count or head size is not static.
    """
    import openvino as ov
    import openvino.opset6 as op6
    import openvino.opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    params = {_name(p.output(0)): p for p in model.get_parameters()}
    results = {_name(r.output(0)): r for r in model.get_results()}
    past = [n for n in params if PAST.fullmatch(n)]
    if not past or "input_ids" not in params:
        raise ExportError(f"not a decoder graph with a key/value cache: inputs {sorted(params)} "
                          "(export it with export_decoder)")
    missing = [n for n in past if n.replace("past_key_values.", "present.", 1) not in results]
    if missing:
        raise ExportError(f"no present output for the past inputs {missing[:4]}: the cache "
                          "cannot be kept inside OpenVINO (stateful)")
    beam = ops.parameter([-1], np.int32, name=BEAM_IDX)
    beam.output(0).set_names({BEAM_IDX})
    batch = ops.gather(ops.shape_of(params["input_ids"]), ops.constant(np.int64([0])), 0)
    sinks = []
    for name in past:
        p = params[name]
        shape = p.get_output_partial_shape(0)
        if shape.rank.get_length() != 4 or not (shape[1].is_static and shape[3].is_static):
            raise ExportError(f"past input {name} has shape {shape}: (batch, kv_heads, past, "
                              "head_dim) with static kv_heads and head_dim expected")
        info = VariableInfo()
        info.data_shape, info.data_type, info.variable_id = (shape, p.get_output_element_type(0),
                                                             name)
        var = Variable(info)
        dims = ops.constant(np.int64([shape[1].get_length(), 0, shape[3].get_length()]))
        empty = ops.broadcast(ops.constant(np.zeros((), np.float32)).output(0),
                              ops.concat([batch, dims], 0))
        if p.get_output_element_type(0) != ov.Type.f32:
            empty = ops.convert(empty, p.get_output_element_type(0))
        cache = op6.read_value(empty, var)
        if reorder:
            cache = ops.gather(cache, beam, ops.constant(np.int64(0)))
        for target in list(p.output(0).get_target_inputs()):
            target.replace_source_output(cache.output(0))
        res = results[name.replace("past_key_values.", "present.", 1)]
        src = res.input_value(0)
        # Assign takes a node (its first output) in the Python API
        sinks.append(op6.assign(src.get_node() if src.get_index() == 0
                                else ops.convert(src, src.get_element_type()), var))
        model.remove_result(res)
        model.remove_parameter(p)
    if reorder:
        model.add_parameters([beam])
    model.add_sinks(sinks)
    model.validate_nodes_and_infer_types()
    return past
