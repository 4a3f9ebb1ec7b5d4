"""The documents stay true: commands parse, cited files and headings exist, the layer map matches the code.

The README is the user's guide, docs/method.md the paper-to-code map, docs/architecture.md the layers,
docs/performance.md the figures. These tests read them as a user would: every command line written
there is parsed by that command's own parser, every file they name is in the repository, every link
and cited heading resolves.
"""

import argparse
import contextlib
import importlib
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CITATION = re.compile(r"docs/method\.md#([a-z0-9-]+)")

# The README's two commands, exactly: CI and new users copy them as they are.
MAIN_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e ".[test]" '
                "&& .venv/bin/python sweeps/ablation.py --profile smoke")
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e ".[test]" '
                '&& .venv/bin/python -m pytest -m "slow or not slow"')

# Files of the reference codes that the method notes name; they are not ours.
REFERENCE_CODE_FILES = {"compute_metrics.py", "cspnet.py"}
REPOSITORY_ROOTS = ("equicsp/", "sweeps/", "benchmarks/", "cluster/", "mlflow/", "docs/", "tests/", ".ci/")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}


def sources() -> list[Path]:
    return sorted((ROOT / "equicsp").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))


def code_lines(markdown: str) -> list[str]:
    """Inline code spans, and the lines of fenced and indented code blocks."""
    lines = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.DOTALL))
    for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.DOTALL):
        lines += block.splitlines()
    lines += [line[4:] for line in markdown.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    return [line.strip() for line in lines]


def commands(markdown: str) -> list[list[str]]:
    """Every equicsp command line in a document, as words: `&&` chains split, `.venv/bin/python` read as python,
    placeholders (`...`, `<...>`, COMMAND, SCRIPT) left out."""
    found = []
    for line in code_lines(markdown):
        for part in line.split("&&"):
            part = re.sub(r"\s+#.*$", "", part).strip()
            part = re.sub(r"^(\S+=\S+\s+)+", "", part)  # PYTHONPATH=. and the like
            part = re.sub(r"^(\.venv/bin/)?python3? ", "python ", part)
            if "..." in part or "<" in part or "COMMAND" in part or "SCRIPT" in part:
                continue
            if re.match(r"(python -m equicsp\.|python sweeps/|python benchmarks/|equicsp |ray submit )", part):
                found.append(shlex.split(part))
    return found


class Parsed(BaseException):
    """Raised by the patched parser once a command line has parsed: the command does not run."""


@contextlib.contextmanager
def parse_only():
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_script(path: str, argv: list[str]) -> None:
    assert (ROOT / path).is_file(), f"no script {path}"
    main = runpy.run_path(str(ROOT / path), run_name="docs_check")["main"]
    with parse_only(), pytest.raises(Parsed):
        main(argv)


def parse_command(words: list[str]) -> None:
    """Parse one documented command line with its command's own parser, or fail with argparse's message."""
    from equicsp.cli.main import COMMANDS

    if words[0] == "ray":  # ray submit CLUSTER.yaml SCRIPT -- ARGS: the script gets what follows `--`
        _, _, cluster, script, *rest = words
        assert (ROOT / cluster).is_file(), f"no cluster config {cluster}"
        assert not rest or rest[0] == "--", f"`ray submit` passes a script's options after `--`: {shlex.join(words)}"
        return parse_script(script, rest[1:])
    if words[0] == "equicsp":
        command, rest = words[1], words[2:]
        assert command in COMMANDS, f"`equicsp {command}`: the console script has {sorted(COMMANDS)}"
        if command == "sweep":
            return parse_script(rest[0], rest[1:])
    elif words[1] == "-m":
        command, rest = words[2].removeprefix("equicsp."), words[3:]
        assert (ROOT / "equicsp" / f"{command}.py").is_file() or (ROOT / "equicsp" / command / "__main__.py").is_file(), \
            f"`python -m equicsp.{command}` is no module"
    else:
        return parse_script(words[1], words[2:])
    main = importlib.import_module(f"equicsp.cli.{command}").main
    with parse_only(), pytest.raises(Parsed):
        main(rest)


def test_the_readme_is_a_guide_of_a_few_hundred_lines():
    lines = README.read_text().count("\n")
    assert lines <= 220, f"README.md has {lines} lines: figures go to docs/performance.md, history to CHANGELOG.md"


def test_the_readme_holds_the_two_commands_as_ci_and_users_copy_them():
    blocks = code_lines(README.read_text())
    assert MAIN_COMMAND in blocks
    assert TEST_COMMAND in blocks


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_every_documented_command_line_parses(document):
    documented = commands(document.read_text())
    for words in documented:
        try:
            parse_command(words)
        except SystemExit as error:  # argparse's error: unknown option, missing value, bad choice
            pytest.fail(f"{document.name}: `{shlex.join(words)}` does not parse (exit {error.code})")
    if document == README:
        assert len(documented) >= 15, "the README's commands table was not found"


def test_the_readme_shows_a_ray_submit_and_a_local_sweep_without_the_separator():
    documented = commands(README.read_text())
    assert any(words[:2] == ["ray", "submit"] for words in documented)
    local = [words for words in documented if words[0] == "python" and words[1].startswith("sweeps/")]
    assert local and all("--" not in words for words in local)


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda path: path.name)
def test_every_file_a_document_names_exists(document):
    tracked = [path.relative_to(ROOT).as_posix() for folder in ("equicsp", "sweeps", "benchmarks", "tests")
               for path in (ROOT / folder).rglob("*.py")]
    missing = []
    for token in re.findall(r"`([^`\s]+)`", document.read_text()):
        token = token.split("#")[0].rstrip(",.")
        if token.startswith(REPOSITORY_ROOTS):
            if not (ROOT / token).exists():
                missing.append(token)
        elif token.endswith(".py") and re.fullmatch(r"[\w/]+\.py", token) and token not in REFERENCE_CODE_FILES \
                and not any(path == token or path.endswith("/" + token) for path in tracked):
            missing.append(token)
    assert not missing, f"{document.name} names files that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("document", [README, ROOT / "CHANGELOG.md", *DOCS], ids=lambda path: path.name)
def test_every_link_between_documents_resolves(document):
    broken = []
    text = document.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or anchor and anchor not in anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{document.name}: broken links {broken}"


def test_the_architecture_page_draws_the_layers_in_the_order_the_import_test_enforces():
    from test_imports import LAYERS

    text = (ROOT / "docs" / "architecture.md").read_text()
    drawn = [line.split("/")[0].strip() for line in text.splitlines() if re.match(r"    [a-z]+/ ", line)]
    assert [layer for layer in drawn if layer in LAYERS] == list(LAYERS)


def test_the_architecture_page_names_every_module_of_every_layer():
    text = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "equicsp").glob("*/*.py")
                     if path.stem not in ("__init__", "__main__") and f"`{path.name}`" not in text)
    assert not unnamed, f"docs/architecture.md does not say what these hold: {unnamed}"


def test_no_module_cites_a_method_file_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in sources() if "METHOD.md" in path.read_text()
              and path.name != "test_docs.py"]
    assert not citing, f"cite docs/method.md instead: {citing}"


def test_every_cited_section_of_the_method_notes_exists():
    known = anchors((ROOT / "docs" / "method.md").read_text())
    cited = {(str(path.relative_to(ROOT)), anchor) for path in sources() for anchor in CITATION.findall(path.read_text())}
    cited |= {(str(doc.relative_to(ROOT)), anchor) for doc in [README, *DOCS] if doc.name != "method.md"
              for anchor in CITATION.findall(doc.read_text())}
    assert cited, "the code cites the method notes"
    missing = sorted((path, anchor) for path, anchor in cited if anchor not in known)
    assert not missing, f"no such heading in docs/method.md: {missing}"


def test_the_method_notes_have_the_sections_the_readme_promises():
    known = anchors((ROOT / "docs" / "method.md").read_text())
    assert {"notation", "lattice", "coordinates", "denoiser", "training-objective", "sampling", "evaluation",
            "step-sizes", "generation"} <= known
