"""Graphs: a trained net written as ONNX (encoder, decoder, decoder classifier) and MindIR, quantized, checked for
parity (the export targets registry), or run outside a bundle."""
