"""MindSpore cells: the encoder, the decoder, the classifiers over them, the prompt methods and poolings (each with
its ONNX emitter), and the ONNX op helpers every graph writer shares."""
