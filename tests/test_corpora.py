"""The corpora shipped in corpora/ are the files their READMEs describe: every file of a corpus
is listed in its README's checksum lines (`sha256  path`, as `sha256sum` prints them) and has
that SHA-256, and each README names a source and a licence."""
import hashlib
import re
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[1] / "corpora"
LINE = re.compile(r"^\s*([0-9a-f]{64})  (\S+)\s*$", re.MULTILINE)
NAMES = sorted(p.name for p in CORPORA.iterdir() if p.is_dir())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_the_corpora_are_there():
    assert {"tinyshakespeare", "babi"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_file_matches_the_checksum_in_its_readme(name):
    folder = CORPORA / name
    readme = (folder / "README.md").read_text(encoding="utf-8")
    listed = {path: digest for digest, path in LINE.findall(readme)}
    shipped = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "README.md"}
    assert listed, f"corpora/{name}/README.md has no `sha256  path` lines"
    assert set(listed) == shipped, (f"corpora/{name}: files without a checksum {sorted(shipped - set(listed))}, "
                                    f"checksums without a file {sorted(set(listed) - shipped)}")
    wrong = [p for p, digest in listed.items() if sha256(folder / p) != digest]
    assert not wrong, f"corpora/{name}: SHA-256 differs from the README for {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_each_readme_names_a_source_and_a_licence(name):
    readme = (CORPORA / name / "README.md").read_text(encoding="utf-8")
    assert "**Source**" in readme and "**Licence**" in readme
