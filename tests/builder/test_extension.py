"""Adding kinds from outside the package: a prompt method and an architecture registered from test files alone
(tests/extensions.py), then a bundle built with both through the public Python API, exported (MindIR and ONNX,
parity-checked), and served by a real `pt-run serve` process that knows nothing of either."""

import pytest

from extensions import DISTILBERT, EmbeddingShift, write_distilbert
from ptbundle import builder
from ptbundle.builder.backbones import architectures
from ptbundle.builder.models import prompts
from ptbundle.runtime import Bundle
from serving import Server


@pytest.fixture(scope="module")
def registered():
    architectures.register(DISTILBERT)
    prompts.register("embedding-shift", EmbeddingShift)
    yield
    architectures.ARCHITECTURES.pop("distilbert", None)
    prompts.PROMPTS.pop("embedding-shift", None)


def test_a_method_and_an_architecture_from_outside_build_export_and_serve(registered, toy_files, tmp_path):
    backbone = write_distilbert(tmp_path / "distilbert")
    recipe = builder.Recipe(method="embedding-shift", virtual_tokens=3, epochs=1, batch_size=16, max_length=32,
                            prompt_lr=0.05, head_lr=0.05)
    data = builder.load_data(train=toy_files[0], dev=toy_files[1])
    built = builder.build(data, recipe, backbone=backbone, prompt="soft", out=tmp_path / "exports", name="shift",
                          log=lambda message: None)
    assert [b.path.name for b in built] == ["shift"]

    bundle = Bundle.load(built[0].path)
    task = bundle.manifest.only
    assert (task.prompt_method, task.details["shift_of"], bundle.manifest.backbone.model_type) == (
        "embedding-shift", 3, "distilbert")
    assert set(bundle.manifest.export) >= {"mindir", "onnx"}  # both graphs held to the trained net
    assert task.details["peft"] == "not expressible: prompt method 'embedding-shift'"  # the base class's refusal
    texts = ["a great movie", "the worst film ever"]
    expected = bundle.predict(texts)

    server = Server(built[0].path)
    try:
        status, body = server.predict("shift", texts)
    finally:
        server.stop()
    assert status == 200
    assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
    for got, want in zip(body["predictions"], expected):
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)


def test_a_registered_method_is_a_recipe_choice_and_an_unregistered_one_is_not(registered):
    assert builder.Recipe(method="embedding-shift").method == "embedding-shift"
    with pytest.raises(builder.PtbundleError, match="--method 'no-such-method': choose one of"):
        builder.Recipe(method="no-such-method")

