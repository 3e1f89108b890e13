"""The pieces of training, each small and importable on its own; `kimi_jax/train.py` is the loop that runs them.

state.py       TrainState (params, router biases, optimizer state), its shapes and shardings, creation, saving
optimizer.py   the learning-rate schedule and the optimizer (AdamW or MuonClip) a run config asks for
step.py        the loss and the jit-compiled train and eval steps
evaluation.py  held-out evaluation: fixed batches, the same numbers on every rerun and resume
guards.py      what keeps a long run safe: non-finite steps, SIGTERM, profiling a range of steps
metrics.py     metrics.jsonl / TensorBoard, where each window's time went, the progress bar
"""
