"""Render the benchmark summaries under bench/results/ as one markdown page (docs/results.md by default).

    make bench                      # writes bench/results/all.json (bench/run.py)
    python bench/report.py          # -> docs/results.md
    python bench/report.py --results DIR --out FILE

A summary is the JSON object bench/run.py's summarize() returns and main() writes as all.json: it is
recognized by its keys, so copies kept under other names (all-before.json) are rendered too, and the
stage files beside it (roofline.json, inference.json, ...) are not. Its "table" rows are already
formatted by run.py (median [min-max], ratios, targets); this script lays them out and adds what the
rows leave implicit: the machine, the library versions, the run's mode and the targets' verdicts.

all.json records its run's date (UTC); for a summary written before it did, the page gives the file's
modification time.

Standard library and click only: it must run where the benchmarks' own dependencies are not installed.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
# The keys summarize() always writes; a JSON object without all of them is not a summary.
SUMMARY_KEYS = ("mode", "bundle", "machine", "versions", "limit", "targets", "table", "stage_seconds")
# bench/run.py's COLUMNS, in its order and with its titles: the peer column is PyTorch eager + PEFT.
COLUMNS = (("figure", "figure"), ("ours", "ours median [min-max]"), ("ours_limit", "% of limit"),
           ("peer", "torch median [min-max]"), ("peer_limit", "% of limit"), ("ratio", "ours / peer"),
           ("target", "target"), ("met", "met"))
MODE_NOTE = {"quick": "`--quick`: a few repeats and steps; figures not for reporting.",
             "smoke": "`--smoke`: a test of the harness on tiny sizes; not figures."}
# Which way each of run.py's targets points (its checks: value >= target, or <= / <); unknown ones show the number.
DIRECTION = (("fp32_vs_", ">="), ("int8_vs_", ">="), ("bf16_vs_", ">="), ("inference_fraction_of_limit", ">="),
             ("int8_accuracy_loss_points", "<="), ("bf16_accuracy_loss_points", "<="), ("epoch_vs_peer", "<="), ("cold_start_", "<"),
             ("logits_match", "<="))
HIGH_LOAD = 0.5  # bench/run.py's threshold for "other work shared the CPU"


class ReportError(click.ClickException):
    """One line on stderr, exit status 1."""


def find_summaries(results: Path) -> list:
    """(path, summary) for every summary JSON under `results`, newest file first."""
    found = []
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            # A half-written all.json would otherwise drop out of the page without a word.
            raise ReportError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict) and all(key in data for key in SUMMARY_KEYS):
            found.append((path, data))
    return sorted(found, key=lambda item: (-item[0].stat().st_mtime, str(item[0])))


def cell(value) -> str:
    """A table cell: None as '-', pipes escaped so a figure cannot split its row."""
    text = "-" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def verdict(met) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def target_value(entry: dict) -> str:
    """What a target measured: its value, or what it compares when it has no single value."""
    if entry.get("value") is not None:
        return str(entry["value"])
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    if "max_abs_diff" in entry:  # logits_match: the peer's logits against the bundle's
        return f"{entry['max_abs_diff']:.1e}"
    for ours, peer in (("ours_accuracy", "peer_accuracy"), ("ours", "peer")):
        if isinstance(entry.get(ours), (int, float)):  # same_model_check, accuracy_not_worse
            theirs = entry.get(peer)
            return f"ours {entry[ours]}, peer {'not run' if theirs is None else theirs}"
    return "-"


def required(name: str, entry: dict) -> str:
    """The target with its direction; run.py keeps only the number, its checks hold the direction."""
    if "target" not in entry:
        return "-"
    for prefix, sign in DIRECTION:
        if name.startswith(prefix):
            return f"{sign} {entry['target']}"
    return str(entry["target"])


def machine_line(machine: dict) -> str:
    parts = [machine.get("cpu_model") or "CPU model not recorded",
             f"{machine.get('usable_cores', '?')} usable cores of {machine.get('cpu_count', '?')}"]
    if machine.get("memory_gb") is not None:
        parts.append(f"{machine['memory_gb']} GB")
    if machine.get("simd"):
        parts.append("SIMD " + " ".join(machine["simd"]))
    parts.append(f"Python {machine.get('python', '?')} on {machine.get('platform', '?')}")
    return "; ".join(parts)


def versions_line(versions: dict) -> str:
    out = []
    for side in ("project", "peer"):
        if versions.get(side):
            out.append(f"{side}: " + ", ".join(f"{k} {v}" for k, v in sorted(versions[side].items())))
    return "; ".join(out) or "not recorded"


def shown(path: Path) -> str:
    """A path as the page names it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render_summary(path: Path, summary: dict) -> list:
    machine, limit = summary["machine"], summary["limit"]
    recorded = "date" in summary  # bench/run.py records it; older summaries have only their file's time
    written = datetime.datetime.fromisoformat(summary["date"]) if recorded else \
        datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    stages = summary["stage_seconds"]
    lines = [f"## {written:%Y-%m-%d %H:%M} UTC: {Path(summary['bundle']).name} ({summary['mode']})", "",
             f"- File: `{shown(path)}`" + ("" if recorded else " (its modification time is the date above)"),
             f"- Machine: {machine_line(machine)}"]
    load = (machine.get("load_average_1_5_15") or [None])[0]
    if load is not None:
        note = " (high: other work shared the CPU, the figures are low and noisy)" if load > HIGH_LOAD else ""
        lines.append(f"- Load average before the run: {load}{note}")
    if summary.get("commit"):
        lines.append(f"- Commit: {summary['commit']}")
    lines += [f"- Versions: {versions_line(summary['versions'])}",
              f"- Bundle: `{summary['bundle']}`",
              f"- GEMM limit: {limit['limit_gflops']:.1f} GFLOP/s ({limit['limit_library']}, {limit['tokens']} tokens); "
              + ", ".join(f"{k} {v:.1f}" for k, v in limit["layer_gflops"].items())]
    if "total" in stages:
        lines.append(f"- Run time: {stages['total']:.0f} s ("
                     + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items() if k != "total") + ")")
    if summary["mode"] in MODE_NOTE:
        lines.append(f"- Mode: {MODE_NOTE[summary['mode']]}")
    if summary.get("peer_skipped"):
        lines.append("- No PyTorch peer in this run: its columns are empty.")
    lines += ["", "### Figures", ""]
    lines += table([title for _, title in COLUMNS], [[row.get(key, "") for key, _ in COLUMNS]
                                                     for row in summary["table"]])
    lines += ["", "### Targets", ""]
    lines += table(["target", "measured", "required", "met"],
                   [[name, target_value(entry), required(name, entry), verdict(entry.get("met"))]
                    for name, entry in summary["targets"].items()])
    return lines + [""]


def render(summaries: list, results: Path) -> str:
    lines = ["<!-- generated by `python bench/report.py`: do not edit by hand -->",
             "# Benchmark results", "",
             "Generated by `python bench/report.py` from the summaries `make bench` writes under "
             f"`{shown(results)}`; do not edit by hand: run `make bench`, then the script. Newest run first. "
             "Each figure is median [min-max] over the run's repeats; a ratio is ours over the PyTorch "
             "eager + PEFT peer's median.", ""]
    for path, summary in summaries:
        lines += render_summary(path, summary)
    return "\n".join(lines).rstrip() + "\n"


@click.command()
@click.option("--results", default=str(ROOT / "bench" / "results"), show_default="bench/results",
              type=click.Path(path_type=Path), help="Directory searched, with its subdirectories, for summaries.")
@click.option("--out", default=str(ROOT / "docs" / "results.md"), show_default="docs/results.md",
              type=click.Path(dir_okay=False, path_type=Path), help="Markdown page to write.")
def main(results: Path, out: Path):
    """Render every benchmark summary (bench/run.py's all.json) under --results as markdown."""
    if not results.is_dir():
        raise ReportError(f"{results}: no such directory; run `make bench` first")
    summaries = find_summaries(results)
    if not summaries:
        raise ReportError(f"{results}: no benchmark summary (all.json from bench/run.py) found; "
                          f"run `make bench` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(summaries, results), encoding="utf-8")
    click.echo(f"{len(summaries)} summar{'y' if len(summaries) == 1 else 'ies'} -> {out}")


if __name__ == "__main__":
    main(prog_name="bench/report.py")
