"""qat(): fine-tuning beats PTQ at W4A4, early stopping keeps the best step, write-back is exact."""

import math

import pytest
import torch

from slimformer.data.datasets import get_dataset
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.qat.api import qat, split_rows
from slimformer.qat.config import QatConfig
from slimformer.qat.train import StudentJudge
from slimformer.qat.writeback import set_exact_range, snap_input_scales, to_quantized
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = float(((ref.double() - got.double()) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(float((ref.double() ** 2).sum()) / err)


@pytest.fixture(scope="module")
def digits():
    """vit-digits-seq (trained), its W4A4 repq PTQ (inference form, rounded to nearest: the
    measurements below; with GPTQ's codes, the default since, 100 QAT steps moved agreement
    0.952 -> 0.958 but accuracy 0.946 -> 0.944), train and test rows."""
    torch.manual_seed(0)
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    calib = get_dataset("digits-seq", "calib")
    qm = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4,
                                         calib_samples=128, gptq=False), calib).model
    train = get_dataset("digits-seq", "train", sample=1024)
    test = get_dataset("digits-seq", "test", limit=1000)
    return lm, to_inference(qm, inplace=True), train, test


@torch.no_grad()
def _predict(model, test):
    return model(**test.inputs).argmax(-1)


def test_qat_beats_ptq_on_held_out_test_rows(digits):
    lm, qm, train, test = digits
    torch.set_num_threads(1)  # deterministic reductions
    res = qat(qm, lm.module, QatConfig(steps=100, eval_every=25, weight_lr=3e-4, scale_lr=3e-3,
                                       patience=0), train, progress=None)
    assert (res.loss, res.metric) == ("kl", "pt")
    ref, y = _predict(lm.module, test), test.labels
    before, after = _predict(qm, test), _predict(res.model, test)
    agree0, agree1 = float((before == ref).float().mean()), float((after == ref).float().mean())
    acc0, acc1 = float((before == y).float().mean()), float((after == y).float().mean())
    # measured (1000 test rows, float accuracy 0.960): PTQ agreement 0.952, accuracy 0.940,
    # 9.61 dB; QAT 0.964-0.968, 0.948-0.958 over learning rates (1e-4..1e-3) at 200 steps; with
    # the attention ranges learned 0.964, 0.944, 11.20 dB after 100 steps (200: the same step kept);
    # the cosine rates (default since 2026-12-07), judged every 25 steps: 0.966, 0.944 (step 75
    # kept; judged every 50: 0.954, 0.944; constant rates, every 50: 0.966, 0.950)
    assert agree1 >= agree0 + 0.005 and acc1 >= acc0
    with torch.no_grad():  # output SQNR vs float on the test rows rises too
        f = lm.module(**test.inputs)
        assert sqnr_db(f, res.model(**test.inputs)) > sqnr_db(f, qm(**test.inputs)) + 0.5
    assert res.writeback_db == math.inf or res.writeback_db >= 60
    assert res.log.judgements[0].step == 0 and res.log.steps == 100


def test_early_stopping_keeps_the_best_step(digits):
    lm, qm, train, _ = digits
    cfg = QatConfig(steps=60, eval_every=5, patience=2, weight_lr=0.05, scale_lr=0.05, rows=256)
    res = qat(qm, lm.module, cfg, train)
    js = res.log.judgements
    assert res.log.stopped == "patience" and res.log.steps < 60  # too large a rate: it degrades
    best = max(js, key=lambda j: (-j.metrics["pt"], j.metrics["db"]))
    assert res.log.best_step == best.step
    assert all(j.step <= best.step or not (j.metrics["pt"], -j.metrics["db"]) <
               (best.metrics["pt"], -best.metrics["db"]) for j in js)
    # the student (and the written-back model) hold the kept step's parameters
    _, held = split_rows(train, cfg)
    judge = StudentJudge(lm.module, res.student, held, cfg.batch_size, {"db", "pt"})
    again = judge.measure()
    assert again["pt"] == best.metrics["pt"] and abs(again["db"] - best.metrics["db"]) < 1e-6
    judge = StudentJudge(lm.module, res.model, held, cfg.batch_size, {"db", "pt"})
    assert judge.measure()["pt"] == best.metrics["pt"]


def test_agreement_metric_keeps_the_step_closest_to_float(digits):
    """``metric: agree`` judges top-1 disagreement with the float model, labels or not."""
    from slimformer.errors import UnsupportedModelError

    lm, qm, train, _ = digits
    cfg = QatConfig(steps=40, eval_every=10, patience=0, rows=256, metric="agree")
    res = qat(qm, lm.module, cfg, train)
    js = res.log.judgements
    assert res.metric == "agree" and len(js) == 5
    for j in js:
        assert j.metrics["agree"] == pytest.approx(100 * (1 - j.metrics["agreement"]))
    best = max(js, key=lambda j: (-j.metrics["agree"], j.metrics["db"]))
    assert res.log.best_step == best.step
    with pytest.raises(UnsupportedModelError, match="metric agree needs class scores"):
        qat(qm, lm.module, cfg, train, task="sentence-embedding")


def test_writeback_of_perturbed_student_is_exact(digits):
    """Scales, zero points, weights and biases moved off PTQ's all arrive in our model."""
    from slimformer.qat.convert import learned_parameters, to_brevitas
    from slimformer.qat.layers import QatLinear

    lm, qm, _, test = digits
    bm = to_brevitas(qm)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learned_parameters(bm).values():
            p.mul_(1 + 0.05 * torch.rand(p.shape, generator=gen))
        for a in bm.quant.attention.values():  # our attention ranges, learned in QAT
            for act in (a.q_in, a.k_in, a.v_in):
                act.lo.mul_(1.1)
                act.hi.mul_(0.9)
            a.probs.delta.mul_(0.9)
        for m in bm.modules():
            if isinstance(m, QatLinear):
                m.weight.add_(0.01 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.01 * torch.randn(m.bias.shape, generator=gen))
    snap_input_scales(bm)  # as qat() does: input scales our ranges can hold
    ours = to_quantized(bm, qm)
    assert ours.inference and all(lq.int_weight is not None for lq in ours.quant.linears.values())
    with torch.no_grad():
        x = test.inputs["x"][:256]
        s, o, q = bm(x=x), ours(x=x), qm(x=x)
    assert sqnr_db(s, o) >= 60 and sqnr_db(s, q) < 40  # it moved, and ours moved with it
    assert torch.equal(s.argmax(-1), o.argmax(-1))
    for key, a in bm.quant.attention.items():
        b = ours.quant.attention[key]
        assert all(torch.equal(getattr(a, n).scale_zero()[0], getattr(b, n).scale_zero()[0])
                   for n in ("q_in", "k_in", "v_in"))
        assert torch.equal(a.probs.delta, b.probs.delta)


@pytest.mark.parametrize("softmax", ["auto", "log_sqrt2"])
def test_attention_ranges_get_gradients(digits, softmax):
    """q / k / v ranges (and a uniform probability grid's delta) are trained, or frozen on request."""
    from slimformer.qat.convert import to_brevitas
    from slimformer.qat.train import loss_of, param_groups

    lm, qm, train, test = digits
    if softmax != "auto":  # repq's auto picks uniform probabilities on every site here
        qm = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4,
                                             calib_samples=32, softmax=softmax),
                      get_dataset("digits-seq", "calib")).model
    bm = to_brevitas(qm)
    kind = "uniform" if softmax == "auto" else softmax
    assert {a.probs.kind for a in bm.quant.attention.values()} == {kind}
    frozen = param_groups(bm, QatConfig(learn_attention=False))
    groups = param_groups(bm, QatConfig())
    ranges = [p for a in bm.quant.attention.values() for q in (a.q_in, a.k_in, a.v_in)
              for p in (q.lo, q.hi)] + ([a.probs.delta for a in bm.quant.attention.values()]
                                        if kind == "uniform" else [])
    trained = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in trained for p in ranges)
    assert not any(id(p) in {id(q) for g in frozen for q in g["params"]} for p in ranges)
    assert len(trained) == sum(len(g["params"]) for g in frozen) + len(ranges)
    x = test.inputs["x"][:32]
    with torch.no_grad():
        t = lm.module(x=x)
    loss_of("kl", bm(x=x), t, {"x": x}).backward()
    for a in bm.quant.attention.values():
        for q in (a.q_in, a.k_in, a.v_in):  # the range's ends: at least one moves the grid
            grads = [p.grad for p in (q.lo, q.hi) if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads), q.name
            assert sum(float(g.abs().sum()) for g in grads) > 0, q.name
        if kind == "uniform":
            assert a.probs.delta.grad is not None and float(a.probs.delta.grad.abs()) > 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_exact_range_gives_the_scale_bit_for_bit(symmetric):
    gen, exact = torch.Generator().manual_seed(1), []
    for bits in (3, 4, 8):
        act = ActQuantizer("a", bits)
        act.symmetric = symmetric
        for _ in range(200):
            s = torch.rand(1, generator=gen) * 10.0 ** torch.randint(-4, 2, (1,), generator=gen)
            z = torch.full((1,), 2.0 ** (bits - 1)) if symmetric else \
                torch.randint(0, 2**bits, (1,), generator=gen).float()
            exact.append(set_exact_range(act, s, z))
            got_s, got_z = act.scale_zero()
            assert torch.equal(got_z, z) and torch.equal(got_s, s) == exact[-1]
            assert float((got_s - s).abs()) <= 2 * float(torch.finfo(torch.float32).eps * s)
    # measured: 1080 of 1200 exact; the rest 3-bit asymmetric grids (hi - lo) / 7 steps over s
    assert sum(exact) >= 0.85 * len(exact)


def test_brevitas_input_grid_rounds_as_ours_and_onnx():
    """``round(x / s) + z`` (ours, ONNX QuantizeLinear), not Brevitas's ``round(x / s + z)``.

    They differ on ties (half to even, odd ``z``) and where adding ``z`` loses float32 bits;
    MiniLM-L6's QAT student at step 0 was 22 dB from its PTQ model because of it.
    """
    from slimformer.qat.layers import AsymmetricInput, QatLinear, quantizer_kwargs

    act = ActQuantizer("a", 8)
    s, z = torch.tensor([0.0173]), torch.tensor([101.0])
    assert set_exact_range(act, s, z)
    act.mode = "quant"
    kw = quantizer_kwargs("input_", s.reshape(()), z.reshape(()), 8, False)
    layer = QatLinear(4, 2, bias=False, input_quant=AsymmetricInput, return_quant_tensor=False,
                      **kw)
    gen = torch.Generator().manual_seed(0)
    ties = (torch.arange(-90, 150, dtype=torch.float32) + 0.5) * s  # x / s on .5 (near it)
    x = torch.cat([ties, torch.randn(100_000, generator=gen) * 1.5]).reshape(-1, 4)
    with torch.no_grad():
        assert torch.equal(layer.input_quant(x), act(x))


def test_unreachable_learned_input_scale_is_snapped_then_written_back_exactly(digits):
    from slimformer.qat.convert import to_brevitas
    from slimformer.qat.layers import QatLinear

    lm, _, _, test = digits
    qm = quantize(lm.module, QuantConfig(method="minmax", calib_samples=64, symmetric=True),
                  get_dataset("digits-seq", "calib")).model  # Brevitas: s = v / 128, ours: a / 127
    bm = to_brevitas(qm)
    layers = list({id(m.input_quant): m for m in bm.modules() if isinstance(m, QatLinear)
                   and m.input_quant.is_quant_enabled}.values())  # one per shared quantizer
    gen, unreachable = torch.Generator().manual_seed(3), 0

    def reachable(m) -> bool:
        q = m.input_quant(torch.zeros(1))
        act = ActQuantizer("t", 8)
        act.symmetric = True
        return set_exact_range(act, q.scale.detach().reshape(1), torch.full((1,), 128.0))

    with torch.no_grad():
        for i, m in enumerate(layers):  # learned input scales; odd ones no range gives (if found)
            v = m.input_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl.value
            start = v.clone()
            for _ in range(200):
                v.copy_(start * (1 + 0.1 * torch.rand((), generator=gen)))
                if reachable(m) == (i % 2 == 0):
                    break
            unreachable += not reachable(m)
    moved = snap_input_scales(bm)
    assert moved == unreachable >= 2
    ours = to_quantized(bm, qm)
    with torch.no_grad():
        x = test.inputs["x"][:256]
        assert sqnr_db(bm(x=x), ours(x=x)) >= 60
    for m in layers:  # every learned input grid is now exactly ours
        q = m.input_quant(torch.zeros(1))
        lq = next(lq for lq in ours.quant.linears.values() if lq.name == m.site)
        s, z = lq.act.scale_zero()
        assert torch.equal(s, q.scale.detach().reshape(1)) and torch.equal(
            z, q.zero_point.detach().reshape(1) + 128)  # Brevitas's signed codes: ours - 128


def test_a_batch_over_the_memory_budget_runs_as_accumulated_micro_batches(digits, monkeypatch):
    """One backward's saved activations are measured per row and the batch split to fit."""
    from slimformer.data.datasets import trim_padding
    from slimformer.qat import train as T
    from slimformer.qat.convert import to_brevitas

    lm, qm, rows, _ = digits
    cfg = QatConfig(steps=4, eval_every=2, batch_size=8, rows=128, patience=0)
    student = to_brevitas(qm)
    T.param_groups(student, cfg)
    fit, _ = split_rows(rows, cfg)
    size = [T.saved_bytes(student, trim_padding([fit[i] for i in range(n)])[0])
            for n in (1, 2, 5)]
    per_row = size[1] - size[0]
    assert per_row > 0 and abs((size[2] - size[0]) - 4 * per_row) <= 0.05 * 4 * per_row
    monkeypatch.setattr(T, "available_bytes",
                        lambda: int((size[0] + (3.5 * T.OVERHEAD - 1) * per_row)
                                    / T.MEMORY_SHARE))
    seen = []
    real = T.loss_of
    monkeypatch.setattr(T, "loss_of", lambda loss, s, t, inputs, temp: (
        seen.append(len(next(iter(inputs.values())))), real(loss, s, t, inputs, temp))[1])
    res = qat(qm, lm.module, cfg, rows)
    assert res.log.micro_batch == 3 and res.log.steps == 4
    assert seen == [3, 3, 2] * 4  # every step: 8 rows as 3 + 3 + 2, one backward each
    assert any("micro-batches of 3" in n for n in res.notes)
    assert res.writeback_db == math.inf or res.writeback_db >= 60


def test_layer_wise_distillation_on_blocks_whose_float_outputs_match(digits, monkeypatch):
    """Every block of the model is distilled; one whose folds changed its output is not; the
    hooks leave the teacher and the PTQ model as they were, also when a step fails."""
    import copy

    from slimformer.qat import train as T
    from slimformer.qat.api import matching_blocks
    from slimformer.quantize.blockwise import containers

    lm, qm, rows, test = digits
    x = {"x": test.inputs["x"][:16]}
    before = _predict_raw(qm, x)
    hooks = _hooks(lm.module, qm)
    blocks = [p for c in containers(qm.model, {lq.name.rpartition(".")[0]
                                               for lq in qm.quant.linears.values()}) for p in c]
    kept, note = matching_blocks(qm, lm.module, x)
    assert len(blocks) >= 2 and kept == blocks and f"{len(blocks)} of {len(blocks)} blocks" in note
    changed = copy.deepcopy(qm)
    changed._rebind()
    with torch.no_grad():  # a block whose float output is no longer the teacher's: left out
        norms = [m for m in changed.model.get_submodule(blocks[-1]).modules()
                 if isinstance(m, torch.nn.LayerNorm)]
        norms[-1].weight.mul_(3.0)
    kept, note = matching_blocks(changed, lm.module, x)
    assert kept == blocks[:-1] and "differ" in note
    with torch.no_grad():  # as restored from a folder: float weights = dequantized codes
        for lq in changed.quant.linears.values():
            lq.param[0].copy_(lq._unmatrix(lq.quantized_matrix()))
    kept, note = matching_blocks(changed, lm.module, x)
    assert kept == blocks and "dequantized codes" in note
    assert _hooks(lm.module, qm) == hooks  # none left behind
    assert torch.equal(before, _predict_raw(qm, x))  # modes restored
    seen = []
    real = T.BlockTaps.loss

    def loss(self, inputs):
        out = real(self, inputs)
        seen.append(float(out))
        if len(seen) == 3:
            raise RuntimeError("a failing step")
        return out

    monkeypatch.setattr(T.BlockTaps, "loss", loss)
    with pytest.raises(RuntimeError, match="a failing step"):
        qat(qm, lm.module, QatConfig(steps=5, eval_every=5, rows=128), rows)
    assert len(seen) == 3 and all(v > 0 for v in seen)
    assert _hooks(lm.module, qm) == hooks


def _hooks(*models) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


@torch.no_grad()
def _predict_raw(model, x):
    return model(**x)


def test_cosine_schedule_decays_every_rate_to_zero(digits, monkeypatch):
    """``lr_schedule: cosine``: the rates the optimizer steps with fall from the configured ones
    (step 1) along half a cosine to near 0 (last step); ``constant`` keeps them."""
    from slimformer.qat.train import decay, weight_rate

    lm, qm, train, _ = digits
    seen: list[list[float]] = []
    step = torch.optim.Adam.step

    def record(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    for schedule in ("cosine", "constant"):
        seen.clear()
        cfg = QatConfig(steps=8, eval_every=8, rows=64, batch_size=8, lr_schedule=schedule)
        qat(qm, lm.module, cfg, train)
        first = seen[0]
        assert first[0] == weight_rate(cfg, 4) == 1e-4 and len(seen) == 8
        ratios = [s[0] / first[0] for s in seen]
        assert all(math.isclose(s[i] / first[i], r) for s, r in zip(seen, ratios, strict=True)
                   for i in range(len(first)))  # every group decays alike
        if schedule == "constant":
            assert ratios == [1.0] * 8
        else:
            assert ratios == pytest.approx([decay(cfg, k) for k in range(8)])
            assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))
            assert ratios[4] == pytest.approx(0.5) and ratios[-1] < 0.04


def test_zero_steps_give_back_the_ptq_model(digits):
    """``steps: 0`` (allowed by the config) judges step 0 and writes it back: the PTQ model's
    outputs (the cosine schedule divided by the step count)."""
    lm, qm, train, test = digits
    res = qat(qm, lm.module, QatConfig(steps=0, rows=64, batch_size=8), train)
    assert res.log.steps == 0 and res.log.best_step == 0
    x = {k: v[:64] for k, v in test.inputs.items()}
    with torch.no_grad():
        assert torch.equal(res.model(**x).argmax(-1), qm(**x).argmax(-1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_qat_with_power_of_two_scales_beats_ptq(digits, symmetric):
    """Fixed-point targets: W4A4 with power-of-two scales (log2 thresholds learned, rounded)
    recovers much of what PTQ loses; every zero point stays on its grid."""
    lm, _, train, test = digits
    torch.set_num_threads(1)
    calib = get_dataset("digits-seq", "calib")
    qm = to_inference(quantize(lm.module, QuantConfig(
        method="minmax", weight_bits=4, act_bits=4, calib_samples=128, gptq=False,
        power_of_two_scales=True, symmetric=symmetric), calib).model, inplace=True)
    res = qat(qm, lm.module, QatConfig(steps=100, eval_every=25, weight_lr=3e-4, scale_lr=3e-3,
                                       patience=0), train)
    ref = _predict(lm.module, test)
    agree0 = float((_predict(qm, test) == ref).float().mean())
    agree1 = float((_predict(res.model, test) == ref).float().mean())
    # measured (1000 test rows): symmetric 0.797 -> 0.909, asymmetric 0.889 -> 0.915-0.932 over
    # batch orders (before the zero-point bound knew the power-of-two threshold, asymmetric
    # fell to -0.3 dB)
    assert agree1 >= agree0 + (0.05 if symmetric else 0.015)
    assert res.writeback_db == math.inf or res.writeback_db >= 60


def test_weight_rate_follows_the_bit_width():
    """Default weight rate: 1e-4 at <= 4 bits, halved per bit above. At W8A8 the 4-bit rate
    hops every weight across codes (vit-fmnist: 42.9 dB -> 25-28 dB vs float in 100 steps);
    the 8-bit rate keeps QAT within about a dB of its PTQ start (measured: 41.8-42.5 dB)."""
    from slimformer.qat.convert import to_brevitas
    from slimformer.qat.train import param_groups, weight_rate

    assert [weight_rate(QatConfig(), b) for b in (2, 4, 5, 8)] == [1e-4, 1e-4, 5e-5, 6.25e-6]
    assert weight_rate(QatConfig(weight_lr=3e-4), 8) == 3e-4  # a rate given is used as is
    torch.set_num_threads(1)
    lm = load_model(ZooSpec(name="vit-fmnist"))
    qm = quantize(lm.module, QuantConfig(weight_bits=8, act_bits=8, calib_samples=128),
                  get_dataset("fashion-mnist", "calib")).model
    student = to_brevitas(qm)
    groups = param_groups(student, QatConfig())
    lin = {id(m.weight) for m in student.modules() if hasattr(m, "site")}
    rates = {g["lr"] for g in groups if any(id(p) in lin for p in g["params"])}
    assert lin and rates == {6.25e-6}
    train = get_dataset("fashion-mnist", "train", sample=1024)
    dbs = {}
    for lr in (None, 1e-4):
        cfg = QatConfig(steps=100, eval_every=25, rows=1024, batch_size=16, patience=0,
                        metric="db", weight_lr=lr)
        dbs[lr] = [j.metrics["db"] for j in qat(qm, lm.module, cfg, train).log.judgements]
    start = dbs[None][0]
    assert min(dbs[None][1:]) >= start - 2.0
    assert max(dbs[1e-4][1:]) < start - 10.0
