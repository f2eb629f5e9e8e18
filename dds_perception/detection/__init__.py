"""Detection: anchors, RPN head, box coding, postprocessing, inference speed-ups."""
