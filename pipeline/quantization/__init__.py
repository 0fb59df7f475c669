"""Post-training INT8 quantization: a float ONNX model -> a QDQ ONNX model, with ONNX Runtime.

`settings.py`: what to quantize and how (`QuantizeSettings`); `calibrate.py`: the calibration
images and the activation ranges they give; `qdq.py`: the QDQ model (layer names, exclusions,
`prepare` -> `Calibrated.quantize`); `sensitivity.py`: which layers INT8 hurts and the float
fallback. The integer lowering of a QDQ model is the compiler's (pipeline/compiler/int8.py).
"""
