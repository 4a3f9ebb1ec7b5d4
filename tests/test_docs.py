"""The method notes: every citation in the code points at a heading of docs/method.md, and none at a missing file."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
CITATION = re.compile(r"docs/method\.md#([a-z0-9-]+)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}


def sources() -> list[Path]:
    return sorted((ROOT / "equicsp").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def test_no_module_cites_a_method_file_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in sources() if "METHOD.md" in path.read_text()
              and path.name != "test_docs.py"]
    assert not citing, f"cite docs/method.md instead: {citing}"


def test_every_cited_section_of_the_method_notes_exists():
    known = anchors((ROOT / "docs" / "method.md").read_text())
    cited = {(str(path.relative_to(ROOT)), anchor) for path in sources() for anchor in CITATION.findall(path.read_text())}
    assert cited, "the code cites the method notes"
    missing = sorted((path, anchor) for path, anchor in cited if anchor not in known)
    assert not missing, f"no such heading in docs/method.md: {missing}"


def test_the_method_notes_have_the_sections_the_readme_promises():
    known = anchors((ROOT / "docs" / "method.md").read_text())
    assert {"notation", "lattice", "coordinates", "denoiser", "training-objective", "sampling", "evaluation"} <= known
