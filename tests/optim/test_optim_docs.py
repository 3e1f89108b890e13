"""The MuonClip README snippet (docs/muon_clip.md) runs as written."""

import re

from helpers.paths import DOCS

DOC = DOCS / "muon_clip.md"


def test_readme_snippet_runs():
  section = DOC.read_text().split("## Using MuonClip in your own project", 1)[1]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1
  scope: dict = {}
  exec(compile(blocks[0], str(DOC), "exec"), scope)
  clipped = scope["params"]["attn"]["q"].reshape(64, 4, 16)
  # Heads 1 and 3 had max logits above τ = 100, so their query columns shrank; heads 0 and 2 only took the step.
  assert clipped[:, 1].max() < clipped[:, 0].max() and clipped[:, 3].max() < clipped[:, 2].max()
