"""Regenerates `kjv.txt.gz` (one document per Bible chapter) from Debian's bible-kjv packages.

The packages store the King James Version in the `bible` program's own compressed format, so the script runs
that program (unpacked, not installed) to dump every verse, then writes one document per chapter:

  <Book> <chapter>\\n1 <verse text>\\n2 <verse text>...

Documents are separated by one blank line (they contain none themselves). See README.md for the commands
that fetch and unpack the packages. Output is byte-for-byte reproducible (gzip mtime fixed at 0).

Usage: python build_corpus.py --root /tmp/kjv [--out kimi_jax/data/corpus/kjv.txt.gz]
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import re
import subprocess

_HEADER = re.compile(r"^(\S.*) (\d+)$")  # "Song of Solomon 2"
_VERSE = re.compile(r"^  (\d+) (.+)$")  # "  16 For God so loved..."


def dump_bible(root: pathlib.Path) -> str:
  """Pretty-printed text of Gen 1:1 to Rev 22:21, one verse per line, from `root`/usr/{bin,lib}."""
  cmd = [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l", "1000000", "Gen1:1-Rev22:21"]
  return subprocess.run(cmd, check=True, capture_output=True, text=True, encoding="ascii").stdout


def chapters(dump: str) -> list[str]:
  """Splits the dump into chapter documents: title line, then "<verse number> <text>" lines."""
  docs: list[list[str]] = []
  for line in dump.splitlines():
    if not line.strip():
      continue
    if m := _VERSE.match(line):
      docs[-1].append(f"{m[1]} {m[2].strip()}")
    elif _HEADER.match(line):
      docs.append([line.strip()])
    else:
      raise ValueError(f"unexpected line in bible dump: {line!r}")
  return ["\n".join(doc) for doc in docs]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", type=pathlib.Path, required=True, help="dir where both .deb files were dpkg -x'ed")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).with_name("kjv.txt.gz"))
  args = parser.parse_args()

  docs = chapters(dump_bible(args.root))
  verses = sum(doc.count("\n") for doc in docs)
  if (len(docs), verses) != (1189, 31102):
    raise ValueError(f"expected 1189 chapters and 31102 verses, got {len(docs)} and {verses}")
  text = "\n\n".join(docs) + "\n"
  with open(args.out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
    gz.write(text.encode("utf-8"))
  print(f"wrote {args.out}: {len(docs)} documents, {len(text):,} bytes raw, {args.out.stat().st_size:,} gzipped")


if __name__ == "__main__":
  main()
