"""Demo and test data: synthetic Aperio-style slides and the real CC0 CMU-1-Small-Region slide."""
