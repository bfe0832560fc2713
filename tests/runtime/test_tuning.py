"""runtime.tuning: the variant and token budget measured on this CPU, recorded, read back, and never a change in
what a row gets (whatever the CPU chooses, the tests hold on any x86-64)."""

import json

import numpy as np
import pytest

from conftest import MIXED_TEXTS as TEXTS
from ptbundle.runtime import Bundle, tuning
from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.onnx_backend import OnnxModel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PTBUNDLE_TUNING", raising=False)
    return tmp_path / "cache" / "tuning.json"


def test_first_load_measures_and_records_later_loads_read_it_back(tiny_bundle, cache):
    first = Bundle.load(tiny_bundle)
    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["cpu"] == tuning.cpu() and entry["graph"] == "model.onnx"
    candidates = {f"{v}/whole" for v in OnnxModel.variants} | {f"{entry['variant']}/{b}" for b in tuning.BUDGETS[1:]}
    assert set(entry["measured"]) == candidates | {"call/1x8"} and all(t > 0 for t in entry["measured"].values())
    assert first.model.variant == entry["variant"] and first.model.token_budget == entry["token_budget"]
    assert isinstance(entry["call_tokens"], int) and entry["call_tokens"] >= 0
    assert first.model.call_tokens == entry["call_tokens"]
    # The fastest measured is the one kept.
    kept = f"{entry['variant']}/{entry['token_budget'] or 'whole'}"
    assert entry["measured"][kept] == min(v for k, v in entry["measured"].items() if k.startswith(entry["variant"]))
    before = cache.stat().st_mtime_ns
    again = Bundle.load(tiny_bundle)
    assert cache.stat().st_mtime_ns == before  # read back, not measured again
    assert (again.model.variant, again.model.token_budget, again.model.call_tokens) == \
        (first.model.variant, first.model.token_budget, first.model.call_tokens)
    int8 = Bundle.load(tiny_bundle, int8=True)  # another graph of the backbone: a record of its own
    entries = json.loads(cache.read_text())
    assert len(entries) == 2
    (int8_entry,) = [e for e in entries.values() if e["precision"] == "int8"]
    # an int8 graph runs unfused only: the variant its recorded accuracy was measured with; budgets are timed
    assert {k.split("/")[0] for k in int8_entry["measured"]} == {"unfused", "call"} and int8.model.variant == "unfused"


@pytest.mark.parametrize("variant", OnnxModel.variants)
def test_no_variant_or_token_budget_changes_a_row(tiny_bundle, variant):
    bundle = Bundle.load(tiny_bundle)
    encodings = bundle.encode(TEXTS * 3)
    width = len(bundle.labels)
    whole = batched_logits(OnnxModel(tiny_bundle / "model.onnx"), encodings, bundle.manifest.pad_id, width, 64)
    model = OnnxModel(tiny_bundle / "model.onnx", variant=variant)
    for budget, call_tokens in ((None, None), (8, None), (40, None), (100, None), (None, 0), (40, 4), (None, 1000)):
        model.token_budget, model.call_tokens = budget, call_tokens  # 8 tokens: a row per call; 0: cut at every length
        for order in (True, False):
            got = batched_logits(model, encodings, bundle.manifest.pad_id, width, 64, order)
            np.testing.assert_allclose(got, whole, atol=1e-5, err_msg=f"{variant} {budget} {call_tokens} {order}")


def test_chunks_cover_every_row_once_within_the_budget():
    for rows, longest, budget in ((64, 30, None), (64, 30, 1024), (64, 30, 512), (5, 300, 256), (1, 10, 4)):
        parts = tuning.chunks(rows, longest, budget)
        assert [i for p in parts for i in range(rows)[p]] == list(range(rows))
        for p in parts:
            n = len(range(rows)[p])
            assert n >= 1 and (budget is None or n == 1 or n * longest <= budget)


def test_calls_cover_every_row_once_within_the_budget_at_the_least_cost():
    rng = np.random.default_rng(0)

    def cost(parts, lengths, call_tokens):
        return sum(call_tokens + len(lengths[p]) * lengths[p][-1] for p in parts)

    def partitions(n):  # every way to cut rows 0..n-1 into consecutive calls
        for mask in range(2 ** (n - 1)):
            cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
            yield [slice(a, b) for a, b in zip(cuts, cuts[1:])]

    for _ in range(60):
        n = int(rng.integers(1, 9))
        lengths = np.sort(rng.integers(1, 60, n))
        call_tokens, budget = int(rng.integers(0, 80)), [None, 64, 200][int(rng.integers(0, 3))]
        parts = tuning.calls(lengths, budget, call_tokens)
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        for p in parts:
            rows = len(range(n)[p])
            assert budget is None or rows == 1 or rows * lengths[p][-1] <= budget
        allowed = [q for q in partitions(n) if all(budget is None or q_.stop - q_.start == 1
                                                   or (q_.stop - q_.start) * lengths[q_][-1] <= budget for q_ in q)]
        assert cost(parts, lengths, call_tokens) == min(cost(q, lengths, call_tokens) for q in allowed)
    assert tuning.calls(np.array([5, 9, 30]), 512, None) == tuning.chunks(3, 30, 512)  # not measured: not cut


def test_tuning_off_measures_nothing(tiny_bundle, cache, monkeypatch):
    monkeypatch.setenv("PTBUNDLE_TUNING", "off")
    bundle = Bundle.load(tiny_bundle)
    assert not cache.exists()
    assert (bundle.model.variant, bundle.model.token_budget, bundle.model.call_tokens) == \
        (OnnxModel.variants[0], None, None)


def test_a_record_that_cannot_be_written_or_read_costs_a_measurement_only(tiny_bundle, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("PTBUNDLE_CACHE_DIR", str(blocked / "cache"))
    assert Bundle.load(tiny_bundle).predict(TEXTS[:2])
    monkeypatch.setenv("PTBUNDLE_CACHE_DIR", str(tmp_path / "damaged"))
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tuning.json").write_text("{not json")
    assert Bundle.load(tiny_bundle).predict(TEXTS[:2])
    assert json.loads((tmp_path / "damaged" / "tuning.json").read_text())  # replaced by a good record
