"""What runtime.tuning chooses on this CPU, against every choice measured on real sentences.

    .venv/bin/python bench/perf/tuning.py [--bundle exports/mr-soft] [--data mr] [--batch-size 64] [--repeats 5]

For each graph of the bundle (model.onnx, and model.int8.onnx when it has
one), every variant onnxruntime offers (runtime.onnx_backend's variants:
its own graph optimizations, "fused", and with SkipLayerNorm and BiasGelu
fusion turned off, "unfused") at every token budget of runtime.tuning
(whole batches, 2048, 1024, 512 padded tokens per call) runs --data's test
sentences through Bundle.logits at --batch-size, sorted by length (the
runtime's default): sentences/s, median and min-max of --repeats passes
after a warm-up, the candidates interleaved pass by pass so that a machine
that drifts moves them alike.  Then a Bundle.load with an empty record
measures as a user's first load does (its probe batch) and the table says
what it chose and how far that choice is from the best measured here (an int8
graph is only ever run unfused: its first load times budgets only).
Writes <results>/tuning.json, with the CPU model and flags.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402


def candidates(bundle_path: Path, graph: str) -> dict:
    """(variant, budget) -> a Bundle whose model is that graph opened as that variant with that budget."""
    out = {}
    for variant in common.OnnxModel.variants:
        for budget in common.TUNING_BUDGETS:
            bundle = common.open_bundle(bundle_path, int8=graph == "int8")
            bundle.model = common.OnnxModel(bundle_path / bundle.model.path.name, variant=variant)
            bundle.model.token_budget = budget
            out[variant, budget] = bundle
    return out


def measure(bundles: dict, texts: list, batch_size: int, repeats: int) -> dict:
    for bundle in bundles.values():  # warm-up
        bundle.logits(texts[: 2 * batch_size], batch_size=batch_size)
    seconds = {k: [] for k in bundles}
    for _ in range(repeats):
        for k, bundle in bundles.items():
            start = time.perf_counter()
            bundle.logits(texts, batch_size=batch_size)
            seconds[k].append(time.perf_counter() - start)
    return {k: common.spread([len(texts) / s for s in v], 1) for k, v in seconds.items()}


@click.command()
@common.options()
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--every", default=1, show_default=True, help="Every K-th test sentence.")
def main(backbone, data, smoke, results, bundle_path, batch_size, repeats, every):
    if smoke:
        repeats, batch_size = 1, 8
    bundle_path = Path(bundle_path)
    manifest = common.read_manifest(bundle_path)
    common.check_backbone(manifest, backbone)
    split, examples = common.eval_split(common.load_data(data))
    texts = common.every_kth([e.text for e in examples], every)[: 32 if smoke else None]
    machine = common.machine_info()
    graphs = ["fp32"] + (["int8"] if "model.int8.onnx" in manifest["files"] else [])
    out = {"machine": machine, "bundle": str(bundle_path), "data": data, "split": split, "sentences": len(texts),
           "batch_size": batch_size, "repeats": repeats, "graphs": {}}
    click.echo(f"{machine.get('cpu_model')} {machine.get('simd')}; {len(texts)} {data} {split} sentences,"
               f" batch {batch_size} sorted; {common.cpu_threads()} threads")
    for graph in graphs:
        rates = measure(candidates(bundle_path, graph), texts, batch_size, repeats)
        with tempfile.TemporaryDirectory() as empty:  # a first load on this CPU: it measures its probe
            before = os.environ.get("PTBUNDLE_CACHE_DIR")
            os.environ["PTBUNDLE_CACHE_DIR"] = empty
            try:
                started = time.perf_counter()
                chosen = common.open_bundle(bundle_path, int8=graph == "int8").model
                tuning_seconds = time.perf_counter() - started
            finally:
                if before is None:
                    os.environ.pop("PTBUNDLE_CACHE_DIR")
                else:
                    os.environ["PTBUNDLE_CACHE_DIR"] = before
        best = max(rates, key=lambda k: rates[k]["median"])
        picked = (chosen.variant, chosen.token_budget)
        rows = [{"variant": v, "token_budget": b, "sentences_per_second": r} for (v, b), r in rates.items()]
        out["graphs"][graph] = {
            "rows": rows, "best": {"variant": best[0], "token_budget": best[1]},
            "chosen_by_first_load": {"variant": picked[0], "token_budget": picked[1], "call_tokens": chosen.call_tokens,
                                     "load_seconds_with_measurement": round(tuning_seconds, 2)},
            "chosen_over_best": round(rates[picked]["median"] / rates[best]["median"], 3),
            "best_over_untuned": round(rates[best]["median"]
                                       / rates[common.OnnxModel.variants[0], None]["median"], 3)}
        click.echo(f"\n{graph}: {'variant':<9}{'budget':>8}{'sentences/s':>13} [min-max]")
        for (v, b), r in rates.items():
            mark = (" best" if (v, b) == best else "") + (" chosen" if (v, b) == picked else "")
            click.echo(f"{'':6}{v:<9}{str(b or 'whole'):>8}{r['median']:>13.1f} [{r['min']:.1f}-{r['max']:.1f}]{mark}")
        g = out["graphs"][graph]
        click.echo(f"first load chose {picked[0]}/{picked[1] or 'whole'} in {tuning_seconds:.2f} s: "
                   f"{g['chosen_over_best']:.3f} x the best here; the best is {g['best_over_untuned']:.3f} x"
                   f" the graph's ops as written on whole batches (no tuning)")
    common.write_results(results, "tuning", out)


if __name__ == "__main__":
    main()
