"""GPU check: every zoo base model through compile_backend vs eager, fp16 and fp32.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json [--autotune off]

For each (model, precision): relative L2 error against eager in the same precision and
against an fp32 eager reference, top-1 agreement for classifiers, and the report's summary
(passes fired, groups per kind, implementations, fallbacks). Written after every case.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch


def summarize(report) -> dict:
    out = {"graphs": []}
    for g in report.graphs:
        impls: dict = {}
        for k in g.kernels:
            key = f"{k['kind']}:{k['impl']}"
            impls[key] = impls.get(key, 0) + 1
        out["graphs"].append({
            "name": g.name, "passes": {k: v for k, v in g.passes.items() if v},
            "groups": g.groups_by_kind(), "impls": impls, "compile_s": round(g.compile_s, 2),
            "fallbacks": g.fallbacks[:30], "n_fallbacks": len(g.fallbacks),
        })
    return out


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mlp,resnet50,bert,gpt2,vit")
    p.add_argument("--precisions", default="fp16,fp32")
    p.add_argument("--autotune", default="off")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    sys.path.insert(0, ".")
    import compile_backend
    from compile_backend import zoo

    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
    records = []
    for name in args.models.split(","):
        ref_model, ref_inputs = zoo.get(name, "base", device="cuda")
        with torch.no_grad():
            ref = ref_model(*ref_inputs).float()
        del ref_model
        for prec in args.precisions.split(","):
            rec = {"model": name, "precision": prec, "autotune": args.autotune}
            t0 = time.perf_counter()
            try:
                model, inputs = zoo.get(name, "base", dtype=dtypes[prec], device="cuda")
                report = compile_backend.explain(model, *inputs, precision=prec, autotune=args.autotune)
                rec["explain_s"] = round(time.perf_counter() - t0, 1)
                compiled = compile_backend.compile(model, precision=prec, autotune=args.autotune)
                with torch.no_grad():
                    eager = model(*inputs)
                    out = compiled(*inputs)
                    out = compiled(*inputs)
                torch.cuda.synchronize()
                rec.update(shape=list(out.shape), dtype=str(out.dtype),
                           rel_err_vs_eager=rel(out, eager), rel_err_vs_fp32=rel(out, ref),
                           eager_rel_err_vs_fp32=rel(eager, ref), finite=bool(torch.isfinite(out).all()))
                if spec_logits(zoo, name):
                    rec["top1_agree"] = (out.float().argmax(-1) == eager.float().argmax(-1)).float().mean().item()
                rec["report"] = summarize(report)
                del model, compiled, report
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["traceback"] = traceback.format_exc()[-3000:]
            rec["total_s"] = round(time.perf_counter() - t0, 1)
            records.append(rec)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": _triton(), "records": records}, f, indent=1)
            g = rec.get("report", {}).get("graphs", [{}])[0] if "report" in rec else {}
            print(f"{name:9s} {prec}: err_vs_eager={rec.get('rel_err_vs_eager', float('nan')):.2e} "
                  f"eager_vs_fp32={rec.get('eager_rel_err_vs_fp32', float('nan')):.2e} "
                  f"ours_vs_fp32={rec.get('rel_err_vs_fp32', float('nan')):.2e} top1={rec.get('top1_agree')} "
                  f"t={rec['total_s']}s impls={g.get('impls')} fallbacks={g.get('n_fallbacks')} "
                  f"{rec.get('error', '')}", flush=True)
    return 0


def spec_logits(zoo, name):
    return getattr(zoo.spec(name, "base"), "logits", False)


def _triton():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "absent"


if __name__ == "__main__":
    raise SystemExit(main())
