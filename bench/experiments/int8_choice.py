"""Which int8 quantization a bundle's ONNX graph gets: accuracy, speed and batch independence of the candidates.

    python bench/experiments/int8_choice.py --bundle exports/mr-soft --data mr
    qemu-x86_64 -cpu Haswell .venv/bin/python bench/experiments/int8_choice.py --bundle ... --no-speed --reuse   # AVX2 only

Every candidate quantizes the encoder's GEMMs of model.onnx (never the
embedding tables or the head).  Candidates:

    dyn-s8         dynamic activations, int8 weights per channel (the previous export)
    dyn-s8-rr      same, 7-bit weights (reduce_range: no int16 saturation on AVX2)
    dyn-u8         dynamic activations, uint8 weights per channel (U8U8 kernels)
    fixed-s8-rr    dyn-s8-rr with fixed activation scales from training texts: what pt-build ships
                   (builder/quantize.quantize_int8 itself)
    fixed-u8       dyn-u8 with fixed activation scales
    fixed-s8       dyn-s8 with fixed activation scales (saturates on AVX2)
    qdq-s8-rr      quantize_static, QDQ, MatMul only (Attention has no static quantizer), 7-bit weights

For each: dev/test accuracy, the graph's op counts after onnxruntime's
optimizations, speed (sentences/s through the graph, batch 64 sorted by
length, tokenization excluded; median and min-max of 5 runs) and batch
independence (max |logit difference| of a sentence scored alone and inside a
padded batch of 40).  Figures go to stdout and bench/results/int8_choice.json
(int8_choice.<suffix>.json with --suffix).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

common.quantize_int8  # noqa: B018  (imports MindSpore before onnx: see builder/onnx_export.py)
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
CANDIDATES = ("fp32", "dyn-s8", "dyn-s8-rr", "dyn-u8", "fixed-s8-rr", "fixed-u8", "fixed-s8", "qdq-s8-rr")


def build(name: str, fp32: Path, out: Path, calibration, pad_id: int) -> None:
    from onnxruntime.quantization import QuantType

    if name == "dyn-s8":
        common.quantize_weights(fp32, out, reduce_range=False)
    elif name == "dyn-s8-rr":
        common.quantize_weights(fp32, out, reduce_range=True)
    elif name == "dyn-u8":
        common.quantize_weights(fp32, out, reduce_range=False, weight_type=QuantType.QUInt8)
    elif name == "fixed-s8-rr":  # the exporter's graph, made by the exporter's function
        common.quantize_int8(fp32, out, pad_id, {}, calibration)
    elif name in ("fixed-s8", "fixed-u8"):
        dynamic = out.with_suffix(".dynamic.onnx")
        try:
            common.quantize_weights(fp32, dynamic, reduce_range=False,
                                    weight_type=QuantType.QUInt8 if name == "fixed-u8" else QuantType.QInt8)
            common.fix_activation_scales(dynamic, fp32, out, calibration)
        finally:
            dynamic.unlink(missing_ok=True)
    elif name == "qdq-s8-rr":
        qdq(fp32, out, calibration)
    else:
        raise ValueError(name)


def qdq(fp32: Path, out: Path, calibration) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = [i.name for i in onnx.load(str(fp32)).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else dict(zip(names, batch))

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(common.HEAD_NODES),
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def optimized_ops(path: Path) -> dict:
    """Op counts of the graph onnxruntime actually runs (after its fusions, as the runtime configures them)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = common.session_options()  # as the runtime runs a graph
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=common.UNFUSED)
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def batch_independence(model, encodings, pad_id: int, probes: int = 8, batch: int = 40, seed: int = 0) -> float:
    """Max |logit difference| of sentences scored alone and inside a padded batch of `batch` random others."""
    rng = np.random.RandomState(seed)
    batch = min(batch, len(encodings))
    worst = 0.0
    for i in rng.choice(len(encodings), probes, replace=False):
        others = rng.choice(np.delete(np.arange(len(encodings)), i), batch - 1, replace=False)
        rows = [encodings[j] for j in others]
        at = int(rng.randint(batch))
        rows.insert(at, encodings[i])
        alone = model(*common.pad([encodings[i]], pad_id))[0]
        inside = model(*common.pad(rows, pad_id))[at]
        worst = max(worst, float(np.abs(alone - inside).max()))
    return worst


def speed(model, encodings, pad_id: int, num_labels: int, runs: int) -> dict:
    common.batched_logits(model, encodings[:128], pad_id, num_labels)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        common.batched_logits(model, encodings, pad_id, num_labels, batch_size=64, sort_by_length=True)
        rates.append(len(encodings) / (time.perf_counter() - start))
    return common.spread(rates, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory with model.onnx")
    parser.add_argument("--data", default="mr", help=common.DATA_HELP)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of "
                        + ", ".join(CANDIDATES))
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--limit", type=int, default=0, help="score every k-th example so at most this many"
                        " per split (0: all; for slow emulated runs)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed runs (emulated CPUs)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "int8_choice",
                        help="where the candidate graphs are written (in a folder per bundle graph)")
    parser.add_argument("--reuse", action="store_true", help="reuse candidate graphs already in --workdir")
    parser.add_argument("--probes", type=int, default=8, help="sentences of the alone-vs-batch check")
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="directory of the results JSON")
    parser.add_argument("--suffix", default="", help="results file int8_choice.<suffix>.json")
    parser.add_argument("--smoke", action="store_true", help="3 candidates, 24 texts a split, 1 speed run: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.candidates, args.limit, args.probes = "fp32,dyn-s8,fixed-s8-rr", args.limit or 24, 2

    bundle = common.open_bundle(args.bundle)
    pad_id, labels = bundle.manifest.pad_id, bundle.labels
    dataset = common.load_data(args.data)
    splits = {}
    for split in args.splits.split(","):
        examples = getattr(dataset, split)
        if args.limit and len(examples) > args.limit:
            examples = examples[:: -(-len(examples) // args.limit)]
        splits[split] = (bundle.encode(*common.split_texts(examples)), np.array(dataset.label_ids(examples)))
    # the exporter's calibration: a sample of training texts (builder/build.py int8_inputs)
    calibration = common.calibration_batches(
        bundle.encode(*common.split_texts(common.calibration_sample(dataset.train))), pad_id)

    fp32 = args.bundle / "model.onnx"
    # Graphs and logits belong to one bundle's graph: a folder per model.onnx, so --reuse never mixes two.
    args.workdir = args.workdir / bundle.manifest.files["model.onnx"][:12]
    args.workdir.mkdir(parents=True, exist_ok=True)
    simd = {}
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as features

        simd = {k: bool(features.get(k)) for k in ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI")}
    except ImportError:
        pass
    results = {"bundle": str(args.bundle), "data": args.data, "limit": args.limit, "machine": common.machine_info(),
               "cpu_features_seen_by_numpy": simd, "onnxruntime": ort.__version__,
               "calibration_texts": int(sum(len(b[0]) for b in calibration)), "candidates": {}}
    print(f"cpu features (numpy's view, honest under qemu): {simd}", flush=True)
    cpu_tag = "avx512" if simd.get("AVX512F") else "avx2"
    logits_dir = args.workdir / "logits" / cpu_tag
    logits_dir.mkdir(parents=True, exist_ok=True)
    # fp32 logits per split: computed when fp32 is a candidate (list it first) and kept in --workdir,
    # so that an emulated run of the int8 candidates alone compares with the native fp32 graph.
    reference_file = args.workdir / f"fp32_logits.limit{args.limit}.npz"
    reference = dict(np.load(reference_file)) if "fp32" not in args.candidates.split(",") and \
        reference_file.exists() else {}
    for name in args.candidates.split(","):
        path = fp32 if name == "fp32" else args.workdir / f"{name}.onnx"
        if name != "fp32" and not (args.reuse and path.exists()):
            started = time.perf_counter()
            build(name, fp32, path, calibration, pad_id)
            print(f"{name}: built in {time.perf_counter() - started:.1f} s", flush=True)
        model = common.OnnxModel(path)
        row = {"ops": optimized_ops(path)}
        for split, (encodings, gold) in splits.items():
            logits = common.batched_logits(model, encodings, pad_id, len(labels))
            row[split] = round(common.metrics(logits.argmax(-1), gold, len(labels))["accuracy"] * 100, 2)
            np.save(logits_dir / f"{name}.{split}.limit{args.limit}.npy", logits)
            # The same graph's logits on the other kind of CPU (a run under qemu -cpu Haswell, or a native one).
            other = args.workdir / "logits" / ("avx512" if cpu_tag == "avx2" else "avx2") / \
                f"{name}.{split}.limit{args.limit}.npy"
            if other.exists():
                row[f"{split}_vs_other_cpu_max_abs"] = float(np.abs(np.load(other) - logits).max())
            if name == "fp32":
                reference[split] = logits
            elif split in reference:  # closeness to the fp32 graph: finer than accuracy on ~1,000 texts
                diff = np.abs(logits - reference[split])
                row[f"{split}_vs_fp32"] = {
                    "same_prediction_pct": round(float((logits.argmax(-1) == reference[split].argmax(-1)).mean())
                                                 * 100, 2),
                    "mean_abs_logit_diff": round(float(diff.mean()), 4), "max_abs_logit_diff": round(float(diff.max()), 4)}
        row["batch_independence_max_abs"] = batch_independence(model, splits[next(iter(splits))][0], pad_id,
                                                               args.probes)
        if not args.no_speed:
            row["sentences_per_s"] = speed(model, splits[list(splits)[-1]][0], pad_id, len(labels),
                                           runs=1 if args.smoke else 5)
        results["candidates"][name] = row
        if name == "fp32":
            np.savez(reference_file, **reference)
        accuracy = "  ".join(f"{s} {row[s]:.2f}" + (f" (={row[s + '_vs_fp32']['same_prediction_pct']:.1f}%"
                                                     f" |d|{row[s + '_vs_fp32']['mean_abs_logit_diff']:.3f})"
                                                     if s + "_vs_fp32" in row else "") for s in splits)
        rate = row.get("sentences_per_s")
        rate = f"  {rate['median']:.0f}/s [{rate['min']:.0f}-{rate['max']:.0f}]" if rate else ""
        accuracy += "".join(f"  {s} vs other CPU {row[s + '_vs_other_cpu_max_abs']:.1e}" for s in splits
                            if s + "_vs_other_cpu_max_abs" in row)
        print(f"{name:12s} {accuracy}  alone-vs-batch {row['batch_independence_max_abs']:.1e}{rate}", flush=True)
        print(f"{'':12s} ops {row['ops']}", flush=True)
    common.write_results(args.results, f"int8_choice.{args.suffix}" if args.suffix else "int8_choice", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
