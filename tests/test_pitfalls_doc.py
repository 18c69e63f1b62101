"""docs/pitfalls.md stays in step with the code: every cited pitfall has an entry, every cited test exists.

The doc numbers the original training code's defects 1..21 as `### N. title` headings; code,
tests and notebooks cite them as "pitfall N" and name tests `test_pitfall_N_...`.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "pitfalls.md"
README = ROOT / "README.md"
THIS_FILE = Path(__file__).resolve()
NUM_PITFALLS = 21

ENTRY_HEADING = re.compile(r"^###[ \t]+(\d+)\.[ \t]+\S", re.MULTILINE)
# "pitfall 12", "Pitfall 13", "pitfalls 15-19", "pitfalls 1, 2 and 5".
MENTION = re.compile(r"\bpitfalls?[ \t]+(\d+(?:[ \t]*(?:[-\u2013,]|and|to)[ \t]*\d+)*)", re.IGNORECASE)
TEST_NAME = re.compile(r"\btest_pitfall_(\d+)_\w*")
CITATION = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
NO_TEST_YET = "no test guards"


def doc_entries(text: str) -> dict[int, str]:
    """Entry number -> the entry's text (from its heading to the next heading of level 2 or 3)."""
    headings = list(re.finditer(r"^#{2,3}[ \t]", text, re.MULTILINE))
    entries: dict[int, str] = {}
    for i, heading in enumerate(headings):
        match = ENTRY_HEADING.match(text, heading.start())
        if match is None:
            continue
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        number = int(match.group(1))
        assert number not in entries, f"docs/pitfalls.md has entry {number} twice"
        entries[number] = text[heading.start() : end]
    return entries


def numbers_in(mention: str) -> set[int]:
    """The pitfall numbers of one mention's number list: "15-19" is a range, "1, 2 and 5" a list."""
    numbers: set[int] = set()
    for part in re.split(r"[ \t]*(?:,|and)[ \t]*", mention):
        bounds = [int(n) for n in re.split(r"[ \t]*(?:[-\u2013]|to)[ \t]*", part) if n]
        numbers.update(range(bounds[0], bounds[-1] + 1))
    return numbers


def mentioned_pitfalls() -> dict[int, list[str]]:
    """Pitfall number -> the files (relative paths) that mention it in cnx/, tests/ and notebooks/."""
    files = [
        *sorted((ROOT / "cnx").rglob("*.py")),
        *sorted((ROOT / "tests").rglob("*.py")),
        *sorted((ROOT / "notebooks").glob("*.ipynb")),
    ]
    found: dict[int, list[str]] = {}
    for path in files:
        if path.resolve() == THIS_FILE:
            continue
        text = path.read_text(encoding="utf-8")
        numbers = {int(m.group(1)) for m in TEST_NAME.finditer(text)}
        for match in MENTION.finditer(text):
            numbers |= numbers_in(match.group(1))
        for number in numbers:
            found.setdefault(number, []).append(str(path.relative_to(ROOT)))
    return found


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions pytest collects from one file (module level and in classes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
    return names


@pytest.fixture(scope="module")
def entries() -> dict[int, str]:
    return doc_entries(DOC.read_text(encoding="utf-8"))


def test_the_doc_has_exactly_the_entries_1_to_21_in_order(entries):
    assert list(entries) == list(range(1, NUM_PITFALLS + 1))


def test_every_pitfall_mentioned_in_code_tests_and_notebooks_has_an_entry(entries):
    mentioned = mentioned_pitfalls()
    assert mentioned, "no pitfall mentions found: the search pattern is broken"
    missing = {n: files for n, files in sorted(mentioned.items()) if n not in entries}
    assert not missing, f"pitfalls mentioned but absent from docs/pitfalls.md: {missing}"


def test_number_lists_are_read_as_ranges_and_lists():
    assert numbers_in("15-19") == {15, 16, 17, 18, 19}
    assert numbers_in("1, 2 and 5") == {1, 2, 5}
    assert numbers_in("12") == {12}
    text = "Pitfall 13 ... pitfalls 3-4, and test_pitfall_21_every_conv"
    assert {n for m in MENTION.finditer(text) for n in numbers_in(m.group(1))} == {3, 4, 13}
    assert [int(m.group(1)) for m in TEST_NAME.finditer(text)] == [21]


def test_a_missing_entry_is_noticed(entries):
    """The parser has teeth: dropping one entry from the text removes exactly that number."""
    text = DOC.read_text(encoding="utf-8")
    without_17 = text.replace(entries[17], "")
    assert sorted(doc_entries(without_17)) == [n for n in range(1, NUM_PITFALLS + 1) if n != 17]


def test_every_cited_test_exists(entries):
    cited = CITATION.findall(DOC.read_text(encoding="utf-8"))
    assert cited, "docs/pitfalls.md cites no tests"
    missing = []
    for file, name in cited:
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/pitfalls.md cites tests that do not exist: {missing}"


def test_each_entry_says_what_went_wrong_what_cnx_does_and_what_guards_it(entries):
    for number, entry in entries.items():
        lowered = entry.lower()
        assert "went wrong" in lowered and "cnx instead" in lowered, f"entry {number}"
        assert CITATION.search(entry) or NO_TEST_YET in lowered, (
            f"entry {number} neither cites a test nor says that no test guards it yet"
        )


def test_tests_named_for_a_pitfall_are_cited_under_that_entry(entries):
    uncited = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in sorted(defined_tests(path)):
            match = TEST_NAME.fullmatch(name)
            if match is None:
                continue
            number = int(match.group(1))
            if f"tests/{path.name}::{name}" not in entries.get(number, ""):
                uncited.append(f"tests/{path.name}::{name} (pitfall {number})")
    assert not uncited, f"not cited under their entry in docs/pitfalls.md: {uncited}"


def test_readme_defines_the_original_training_code_and_links_the_doc():
    text = README.read_text(encoding="utf-8")
    assert re.search(r'"the original training code"\s+means', text, re.IGNORECASE)
    assert "dvlab-research/ControlNeXt" in text and "ControlNeXt-SVD-v2-Training" in text
    assert "](docs/pitfalls.md)" in text


def test_the_ambiguous_phrase_is_gone():
    """ "The seed" once meant the original code, next to the random seed `--seed`; it is spelled out now."""
    phrase = "the " + "seed's"
    files = [*(ROOT / "cnx").rglob("*.py"), *(ROOT / "tests").rglob("*.py"), README]
    offenders = [
        str(path.relative_to(ROOT))
        for path in files
        if path.resolve() != THIS_FILE and phrase in path.read_text(encoding="utf-8").lower()
    ]
    assert not offenders, f"{phrase!r} found in {offenders}: say 'the original training code' instead"
