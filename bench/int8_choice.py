"""Which int8 quantization a bundle's ONNX graph gets: accuracy, speed and batch independence of the candidates.

    python bench/int8_choice.py --bundle /tmp/int8exp/mr-soft --data mr
    qemu-x86_64 -cpu Haswell .venv/bin/python bench/int8_choice.py --bundle ... --no-speed --reuse   # AVX2 only

Every candidate quantizes the encoder's GEMMs of model.onnx (never the
embedding tables or the head).  Candidates:

    dyn-s8         dynamic activations, int8 weights per channel (the previous export)
    dyn-s8-rr      same, 7-bit weights (reduce_range: no int16 saturation on AVX2)
    dyn-u8         dynamic activations, uint8 weights per channel (U8U8 kernels)
    fixed-s8-rr    dyn-s8-rr with fixed activation scales from training texts (builder/quantize.py)
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

import ptbundle.builder.quantize as quantize  # before onnx: imports mindspore first (builder/onnx_export.py)
import onnx
import onnxruntime as ort

from common import machine_info, spread, write_results
from ptbundle.runtime import Bundle
from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.data import load_mr, load_files
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.onnx_backend import UNFUSED, OnnxModel
from ptbundle.runtime.text import pad

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = ("fp32", "dyn-s8", "dyn-s8-rr", "dyn-u8", "fixed-s8-rr", "fixed-u8", "fixed-s8", "qdq-s8-rr")


def build(name: str, fp32: Path, out: Path, calibration) -> None:
    from onnxruntime.quantization import QuantType

    if name == "dyn-s8":
        quantize.quantize_weights(fp32, out, reduce_range=False)
    elif name == "dyn-s8-rr":
        quantize.quantize_weights(fp32, out, reduce_range=True)
    elif name == "dyn-u8":
        quantize.quantize_weights(fp32, out, reduce_range=False, weight_type=QuantType.QUInt8)
    elif name in ("fixed-s8-rr", "fixed-s8", "fixed-u8"):
        dynamic = out.with_suffix(".dynamic.onnx")
        quantize.quantize_weights(fp32, dynamic, reduce_range=name.endswith("-rr"),
                                  weight_type=QuantType.QUInt8 if name == "fixed-u8" else QuantType.QInt8)
        quantize.fix_activation_scales(dynamic, fp32, out, calibration)
    elif name == "qdq-s8-rr":
        qdq(fp32, out, calibration)
    else:
        raise ValueError(name)


def qdq(fp32: Path, out: Path, calibration) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ptbundle.builder.onnx_export import HEAD_NODES

    names = [i.name for i in onnx.load(str(fp32)).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else dict(zip(names, batch))

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(HEAD_NODES),
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def optimized_ops(path: Path) -> dict:
    """Op counts of the graph onnxruntime actually runs (after its fusions, as the runtime configures them)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=UNFUSED)
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def batch_independence(model, encodings, pad_id: int, probes: int = 8, batch: int = 40, seed: int = 0) -> float:
    """Max |logit difference| of sentences scored alone and inside a padded batch of `batch` random others."""
    rng = np.random.RandomState(seed)
    worst = 0.0
    for i in rng.choice(len(encodings), probes, replace=False):
        others = [int(j) for j in rng.choice(len(encodings), batch - 1, replace=False) if j != i][: batch - 1]
        rows = [encodings[j] for j in others]
        at = int(rng.randint(batch))
        rows.insert(at, encodings[i])
        alone = model(*pad([encodings[i]], pad_id))[0]
        inside = model(*pad(rows, pad_id))[at]
        worst = max(worst, float(np.abs(alone - inside).max()))
    return worst


def speed(model, encodings, pad_id: int, num_labels: int, runs: int = 5) -> dict:
    batched_logits(model, encodings[:128], pad_id, num_labels)  # warm-up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        batched_logits(model, encodings, pad_id, num_labels, batch_size=64, sort_by_length=True)
        rates.append(len(encodings) / (time.perf_counter() - start))
    return spread(rates, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory with model.onnx")
    parser.add_argument("--data", default="mr", help="mr, or a directory with train/dev/test .tsv files")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of "
                        + ", ".join(CANDIDATES))
    parser.add_argument("--splits", default="dev,test")
    parser.add_argument("--limit", type=int, default=0, help="score every k-th example so at most this many"
                        " per split (0: all; for slow emulated runs)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed runs (emulated CPUs)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "int8_choice",
                        help="where the candidate graphs are written")
    parser.add_argument("--reuse", action="store_true", help="reuse candidate graphs already in --workdir")
    parser.add_argument("--probes", type=int, default=8, help="sentences of the alone-vs-batch check")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of the results JSON")
    parser.add_argument("--suffix", default="", help="results file int8_choice.<suffix>.json")
    args = parser.parse_args(argv)

    bundle = Bundle.load(args.bundle)
    pad_id, labels = bundle.manifest.pad_id, bundle.labels
    if args.data == "mr":
        dataset = load_mr()
    else:
        d = Path(args.data)
        dataset = load_files(d / "train.tsv", d / "dev.tsv", d / "test.tsv" if (d / "test.tsv").exists() else None)
    splits = {}
    for split in args.splits.split(","):
        examples = getattr(dataset, split)
        if args.limit and len(examples) > args.limit:
            examples = examples[:: -(-len(examples) // args.limit)]
        texts = [e.text for e in examples]
        texts_b = [e.text_b for e in examples] if dataset.is_pair else None
        splits[split] = (bundle.encode(texts, texts_b), np.array(dataset.label_ids(examples)))
    train = quantize.calibration_sample(dataset.train)  # the exporter's calibration: training texts
    calibration = quantize.calibration_batches(
        bundle.encode([e.text for e in train], [e.text_b for e in train] if dataset.is_pair else None), pad_id)

    fp32 = args.bundle / "model.onnx"
    args.workdir.mkdir(parents=True, exist_ok=True)
    simd = {}
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as features

        simd = {k: bool(features.get(k)) for k in ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI")}
    except ImportError:
        pass
    results = {"bundle": str(args.bundle), "data": args.data, "limit": args.limit, "machine": machine_info(),
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
            build(name, fp32, path, calibration)
            print(f"{name}: built in {time.perf_counter() - started:.1f} s", flush=True)
        model = OnnxModel(path)
        row = {"ops": optimized_ops(path)}
        for split, (encodings, gold) in splits.items():
            logits = batched_logits(model, encodings, pad_id, len(labels))
            row[split] = round(classification_metrics(logits.argmax(-1), gold, len(labels))["accuracy"] * 100, 2)
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
            row["sentences_per_s"] = speed(model, splits[list(splits)[-1]][0], pad_id, len(labels))
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
    write_results(args.results, f"int8_choice.{args.suffix}" if args.suffix else "int8_choice", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
