"""Helpers shared by the test folders, imported as `helpers.<module>`: tests/ is on sys.path because it holds the
rootdir conftest.py (pytest's default `prepend` import mode puts a conftest's directory first on sys.path).

  paths        every fixture and repository path, stated once
  train        small_config, read_metrics: a small training run and its metrics.jsonl
  data         the byte tokenizer, batch checks and text-file writers of the data tests
  tokenizer    a tiny Kimi BPE rank file trained on the embedded corpus
  gcs_server   FakeGCS (the `gcs` fixture in tests/conftest.py) and AuthProxy
  tmpfs        run_in_tmpfs: a child process with a private (small, full or read-only) tmpfs mounted

A child Python started by a test finds them (and `launch`) with `paths.python_path_env()`.
"""
