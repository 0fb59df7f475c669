"""Per-layer sensitivity (--analyze) and the float fallback (--max-drop).

The model has one huge stem weight and is quantized with per-tensor weight scales, so the
stem convolution is by far the most sensitive layer: the analysis must rank it first and
the fallback must put it back in float first.
"""

import numpy as np
import pytest

from pipeline.quantization import qdq, sensitivity
from pipeline.quantization.settings import QuantizeSettings
from test_quantize import calibration_images, make_float_onnx

STEM = "/downsample_layers.0/downsample_layers.0.0/Conv"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("sensitivity")
    model = make_float_onnx(work / "outlier.onnx", stem_outlier=20.0)
    images = calibration_images(32)
    calibrated, excluded = qdq.prepare(
        qdq.load_float_model(model), images, QuantizeSettings(per_channel=False), work / "work"
    )
    reference = sensitivity.infer(calibrated.float_model, images, calibrated.batch_size)
    return calibrated, images, reference, work


@pytest.fixture(scope="module")
def analysis(setup):
    calibrated, images, reference, work = setup
    return sensitivity.analyze(calibrated, images, reference, work / "analysis")


def test_sqnr():
    reference = np.array([[3.0, 4.0]])
    assert sensitivity.sqnr_db(reference, reference) == sensitivity.SQNR_CAP_DB
    # signal 25, noise 0.25: 20 dB
    assert sensitivity.sqnr_db(reference, reference + [[0.5, 0.0]]) == pytest.approx(20.0)


def test_every_layer_is_measured_alone_and_ranked(setup, analysis):
    calibrated = setup[0]
    assert len(analysis) == len(calibrated.layers)
    assert {s.layer for s in analysis} == {layer.name for layer in calibrated.layers}
    assert [s.rank for s in analysis] == list(range(1, len(analysis) + 1))
    assert all(a.sqnr_db <= b.sqnr_db for a, b in zip(analysis, analysis[1:]))
    for s in analysis:
        assert 0 <= s.top1_agreement <= 1 and s.cosine_min <= s.cosine_mean <= 1 + 1e-9 and s.max_abs_error >= 0


def test_the_outlier_layer_is_the_most_sensitive(analysis):
    assert analysis[0].layer == STEM and analysis[0].op_type == "Conv"
    # Far worse than the runner-up: that is what the outlier does to a per-tensor scale.
    assert analysis[0].sqnr_db < analysis[1].sqnr_db - 6


def test_analysis_of_a_subset_only_quantizes_those(setup):
    calibrated, images, reference, work = setup
    head = "/head/Gemm"
    result = sensitivity.analyze(calibrated, images, reference, work / "subset", layers=[head])
    assert [s.layer for s in result] == [head]


def test_max_drop_puts_the_most_sensitive_layers_back_in_float(setup, analysis):
    calibrated, images, reference, work = setup
    full = sensitivity.logit_metrics(reference, sensitivity.infer(calibrated.quantize(work / "full.onnx"), images, 1))
    max_drop = 0.0
    assert 1 - full["top1_agreement"] > max_drop, "the model must lose agreement for this test to mean anything"
    excluded: dict[str, str] = {}
    output = work / "fallback.onnx"
    result = sensitivity.fallback(calibrated, images, reference, max_drop, excluded, analysis, output)

    assert result["reached"] and result["final"]["top1_agreement"] == 1.0
    assert result["kept_float"][0] == STEM
    assert result["kept_float"] == [s.layer for s in analysis[: len(result["kept_float"])]]
    assert set(result["kept_float"]) == set(excluded) and "--max-drop 0.0: sensitivity rank 1" in excluded[STEM]
    assert [s["float_layers"] for s in result["steps"]] == list(range(len(result["kept_float"]) + 1))
    assert result["steps"][-1]["sqnr_db"] > result["steps"][0]["sqnr_db"]
    # The written model is the last step's: those layers are float, the rest int8.
    quantized = set(qdq.quantized_layers(output))
    assert quantized == {layer.name for layer in calibrated.layers} - set(excluded)


def test_max_drop_already_met_changes_nothing(setup, analysis):
    calibrated, images, reference, work = setup
    excluded: dict[str, str] = {}
    result = sensitivity.fallback(calibrated, images, reference, 0.5, excluded, analysis, work / "loose.onnx")
    assert result["reached"] and result["kept_float"] == [] and excluded == {} and len(result["steps"]) == 1


def test_report_markdown_has_the_table_and_the_fallback(setup, analysis):
    report = {
        "settings": {"method": "minmax", "percentile": 99.99, "per_channel": False},
        "calibration": {"count": 32, "source": "fashion-mnist:train"},
        "quantized_layers": ["a"], "layer_count": 20,
        "fp32_vs_int8": {"top1_agreement": 1.0, "sqnr_db": 30.0, "cosine_mean": 0.999, "cosine_min": 0.99, "max_abs_error": 0.01},
        "float_layers": {STEM: "--max-drop 0.0: sensitivity rank 1 (SQNR 20.0 dB alone)"},
        "float_ops": [{"family": "LayerNorm", "ops": {"LayerNormalization": 6}, "reason": "why"}],
        "sensitivity": sensitivity.as_records(analysis),
        "max_drop": {"max_drop": 0.0, "reached": True, "kept_float": [STEM], "steps": [
            {"float_layers": 0, "top1_agreement": 0.9, "sqnr_db": 20.0}, {"float_layers": 1, "top1_agreement": 1.0, "sqnr_db": 30.0},
        ]},
    }
    markdown = sensitivity.render_markdown(report)
    assert "| 1 | `" + STEM + "` | Conv |" in markdown
    assert "## --max-drop 0.0" in markdown and "Reached with 1 layer(s)" in markdown
    assert "per tensor" in markdown and "LayerNormalization x6" in markdown


def test_the_stage_rejects_a_max_drop_that_is_not_a_fraction():
    from pipeline.errors import PipelineError
    from pipeline.stages.quantize import check_max_drop

    check_max_drop(0.01)
    with pytest.raises(PipelineError, match="--max-drop 1.5 is not a fraction"):
        check_max_drop(1.5)


def test_records_are_plain_json(analysis):
    import json

    json.loads(json.dumps(sensitivity.as_records(analysis), allow_nan=False))
