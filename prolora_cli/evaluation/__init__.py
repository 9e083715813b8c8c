"""Evaluation: loss and answers on chat data (`eval --data`), published benchmarks (`eval --task`),
batched generation, and the sandbox that runs model-written code."""
