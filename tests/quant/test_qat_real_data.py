"""QAT on real data, a short fixed-seed run on the CPU (issue #19; the full two-epoch run is
``python -m benchmarks.qat_bench``, result in benchmarks/results/qat_mnist_cpu.json): the
trained MNIST CNN, every layer quantized, ~40 steps of QAT from the pretrained weights, top-1
over the first 5,000 test images (the four evaluations were most of its time). The converted
engine's top-1 equals the fake-quantized model's within 0.05 point, does not fall below PTQ's,
and for INT8 / FP8 stays within 0.1 point of FP32."""
import pytest
import torch

data = pytest.importorskip("benchmarks.quant_data")
qat_bench = pytest.importorskip("benchmarks.qat_bench")


@pytest.mark.parametrize("precision", ["int4", "int8", "fp8"])
def test_mnist_qat_short_run(aten_only, precision):
    try:
        r = qat_bench.run(precision, epochs=0.1, device=torch.device("cpu"), compiled=False, eval_images=5000)
    except data.MissingDataError as exc:
        pytest.skip(str(exc))
    print(f"mnist qat {precision}: {r}")
    assert abs(r["qat_engine"] - r["qat_fake_quant"]) <= 0.05
    assert r["qat_engine"] >= r["ptq"] - 0.05
    if precision != "int4":
        assert r["qat_engine"] >= r["fp32"] - 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("precision, cuda_graphs, kernels", [
    ("int8", "auto", "ours"), ("fp8", "auto", "ours"), ("int8", "off", "ours"), ("int8", "auto", "aten")])
def test_gpu_compiled_qat_steps_move_the_parameters_as_eager_does(precision, cuda_graphs, kernels, monkeypatch):
    """The MNIST CNN, QAT-prepared twice, a few Adam steps eager and through the backend on the
    GPU: the parameters move, and as eager's do. The H100 runs of session 13 had the compiled
    QAT leave every parameter where it was (the 2-epoch run's top-1 exactly PTQ's). To say why,
    the first step's gradients are printed (None, zero or wrong), and the variants run without
    CUDA graphs, or with every group in ATen (the engine, its memory plan and CUDA graphs, none
    of our kernels)."""
    import copy

    from compile_backend import pipeline, quant
    from compile_backend.kernels import select

    if kernels == "aten":
        for module in (pipeline, select):
            monkeypatch.setattr(module, "triton_enabled", lambda device: False)

    try:
        train_x, train_y = data.load_mnist("train")
        model = data.load_digit_cnn().cuda()
    except data.MissingDataError as exc:
        pytest.skip(str(exc))
    cfg = quant.QuantConfig(precision=precision, min_features=1)
    calib = [(train_x[i:i + 128].cuda(),) for i in range(0, 512, 128)]
    models = [quant.prepare_qat(copy.deepcopy(model), cfg, calib, progress=False) for _ in range(2)]
    before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    first_grads = []
    for m, compiled in zip(models, (False, True)):
        run = torch.compile(m, backend="compile_backend", options={"cuda_graphs": cuda_graphs}) if compiled else m
        scales = [p for n, p in m.named_parameters() if n.endswith("qat_scale")]
        weights = [p for n, p in m.named_parameters() if not n.endswith("qat_scale")]
        opt = torch.optim.Adam([{"params": weights, "lr": 1e-3}, {"params": scales, "lr": 1e-3}])
        m.train()
        for i in range(6):
            x, y = train_x[i * 128:(i + 1) * 128].cuda(), train_y[i * 128:(i + 1) * 128].cuda()
            loss = torch.nn.functional.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            if i == 0:
                first_grads.append({n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()})
            opt.step()
    wrong = []
    for name, g in first_grads[0].items():
        ours = first_grads[1][name]
        print(f"{precision} {cuda_graphs} {kernels} step-0 gradient {name}: eager norm {float(g.norm()):.4g}, ours "
              + ("None" if ours is None else f"norm {float(ours.norm()):.4g}, diff {float((ours - g).norm()):.4g}"))
        # the first step's gradients are the exact check: same inputs, same weights, only the
        # kernels' rounding apart (H100, session 14: at most 3.5% on the first conv's weight)
        if ours is None or not float((ours - g).norm()) <= 0.1 * float(g.norm()):
            wrong.append((name, "step-0 gradient", None if ours is None else float((ours - g).norm())))
    for (name, eager), (_, ours) in zip(models[0].named_parameters(), models[1].named_parameters()):
        moved = float((eager.detach() - before[name]).norm())
        ours_moved = float((ours.detach() - before[name]).norm())
        diff = float((ours.detach() - eager.detach()).norm())
        print(f"{precision} {cuda_graphs} {kernels} {name}: eager moved {moved:.3g}, ours moved {ours_moved:.3g}, "
              f"ours - eager {diff:.3g}")
        if not (moved > 0 and ours_moved > 0):
            wrong.append((name, moved, ours_moved))
        # a learned per-tensor scale's gradient is a sum of many terms that nearly cancel (~1e-7
        # against its weights' ~1e-2): Adam steps it by about lr whatever its size, so its sign
        # flips with rounding and its path after 6 steps is noise (H100, session 14: ours - eager
        # up to 1.8x its movement); the weights' update as a whole must agree
        elif not name.endswith("qat_scale") and diff > 0.2 * moved:
            wrong.append((name, moved, diff))
    assert not wrong, wrong
