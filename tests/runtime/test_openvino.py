"""The openvino backend (the openvino extra): the bundle's own model.onnx through OpenVINO, fp32 equal to
onnxruntime's, bf16 close to it on a CPU with bf16 units and refused by name on one without."""

import numpy as np
import pytest

from conftest import MIXED_TEXTS as TEXTS, mixed_rows
from ptbundle.runtime import Bundle, tuning
from ptbundle.runtime.errors import BundleError

BF16_CPU = tuning.bf16_units()


def test_fp32_equals_onnxruntime(tiny_bundle):
    ours = Bundle.load(tiny_bundle, backend="openvino")
    assert type(ours.model).__name__ == "OpenVinoModel" and ours.model.precision == "fp32"
    np.testing.assert_allclose(ours.logits(TEXTS), Bundle.load(tiny_bundle).logits(TEXTS), atol=1e-4)


def test_a_merged_bundle_feeds_its_task_tables(merged_bundle):
    rows = mixed_rows(40)
    args = ([r[1] for r in rows], [r[2] for r in rows])
    tasks = [r[0] for r in rows]
    got = Bundle.load(merged_bundle[0], backend="openvino").logits(*args, batch_size=16, task=tasks)
    want = Bundle.load(merged_bundle[0]).logits(*args, batch_size=16, task=tasks)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 units (the refusal is tested instead)")
def test_bf16_runs_on_the_cpus_bf16_units_and_stays_close(tiny_bundle):
    bf16 = Bundle.load(tiny_bundle, precision="bf16")  # openvino: the default backend for bf16
    assert type(bf16.model).__name__ == "OpenVinoModel" and bf16.model.precision == "bf16"
    got, fp32 = bf16.logits(TEXTS * 4), Bundle.load(tiny_bundle).logits(TEXTS * 4)
    # bf16 keeps 8 bits of mantissa: logits move, by far less than they are apart
    assert 0 < np.abs(got - fp32).max() < 0.1


@pytest.mark.skipif(BF16_CPU, reason="this CPU has bf16 units (bf16 is run instead)")
def test_bf16_without_bf16_units_is_refused_by_name(tiny_bundle):
    with pytest.raises(BundleError, match="no bf16 instructions"):
        Bundle.load(tiny_bundle, precision="bf16")


def test_what_a_backend_cannot_run_is_one_line(tiny_bundle):
    with pytest.raises(BundleError, match="backend 'openvino' has no int8 graph .use backend='onnxruntime'"):
        Bundle.load(tiny_bundle, backend="openvino", int8=True)
    with pytest.raises(BundleError, match="backend 'onnxruntime' has no bf16 graph .use backend='openvino'"):
        Bundle.load(tiny_bundle, backend="onnxruntime", precision="bf16")
    with pytest.raises(BundleError, match="precision 'fp16' is not one of fp32, int8, bf16"):
        Bundle.load(tiny_bundle, precision="fp16")


def test_export_records_bf16_beside_int8(tiny_bundle):
    """pt-build export --quantize int8 judges model.onnx in bf16 on the same splits as int8 (accuracy and the
    largest logit difference from fp32), or records why it could not (no bf16 units on the build CPU)."""
    from click.testing import CliRunner
    from ptbundle.runtime.cli import cli

    metrics = Bundle.load(tiny_bundle).manifest.only.metrics
    bf16 = metrics["bf16"]
    if not BF16_CPU:
        assert "no bf16 instructions" in bf16["not_measured"]
        return
    assert bf16["backend"].startswith("openvino ") and set(bf16["max_abs_logit_diff"]) == {"dev", "test"}
    for split in ("dev", "test"):
        assert bf16[split]["n"] == metrics[split]["n"] and 0 < bf16["max_abs_logit_diff"][split] < 0.1
    shown = CliRunner().invoke(cli, ["info", str(tiny_bundle)])
    assert shown.exit_code == 0 and "bf16 test   accuracy" in shown.output, shown.output


def test_served_through_openvino_its_v2_metadata_names_openvino(tiny_bundle):
    """The platform V2 metadata reports is the backend's own (it said mindspore_mindir for OpenVINO before)."""
    tritonhttp = pytest.importorskip("tritonclient.http")
    from serving import Server

    server = Server(tiny_bundle, "--backend", "openvino")
    try:
        client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_model_metadata("toy-soft")["platform"] == "openvino"
        client.close()
    finally:
        server.stop()
