"""The documentation: generated parts up to date, every path and link it names there, its
size and shape, and no account of past work in it."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_md_is_what_make_docs_writes():
    from services.settings_doc import markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(), "stale: run `make docs`"


def test_configuration_md_lists_every_setting_the_code_reads():
    from services.config import ENVIRONMENT

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert dict(re.findall(r"^\| `(DARTSERVE_\w+)` \| (.*) \|$", text, re.M)) == ENVIRONMENT


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 20_000
    head = "\n".join(text.splitlines()[:15])
    assert "make run" in head and "make test" in head


def test_docs_hold_at_most_twenty_files_and_one_result_per_benchmark():
    files = [p for p in (ROOT / "docs").rglob("*") if p.is_file()]
    assert len(files) <= 20, sorted(str(p) for p in files)
    results = sorted(p.name for p in (ROOT / "docs" / "results").iterdir())
    named = re.findall(r"\| `results/([^`]+)` \|", (ROOT / "docs" / "benchmarks.md").read_text())
    expected = []
    for name in named:  # "eval-demo.{json,md,png}" names three
        stem, _, extensions = name.partition(".{")
        expected += [f"{stem}.{ext}" for ext in extensions.rstrip("}").split(",")] if extensions else [name]
    assert results == sorted(expected)  # one current file per benchmark, each in the table


def test_links_and_paths_name_what_exists():
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                assert anchor in _anchors(linked.read_text()), (page.name, target)
        for path in set(re.findall(r"\b((?:k8s|tools|tests|examples|services|proto|docs)/[\w./-]*\w)", text)):
            assert (ROOT / path).exists() or (page.parent / path).exists(), (page.name, path)


def test_deploy_md_has_each_subject():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for heading in ("Quick start with Docker Compose", "Kubernetes", "Autoscaling", "A real 7B model on GPUs", "How large a Redis", "A managed Redis instead of the StatefulSet"):
        assert f"\n## {heading}\n" in text, heading


def test_no_account_of_past_work():
    """History is in git: no numbered sessions, runs or rounds, no earlier recipes."""
    narrative = re.compile(r"\bsessions?\b|\bs\d+-\d|\brun \d\b|\bre-?run\b|earlier (recipe|run|checkpoint|session)s?|\b(second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth) (session|run|round)", re.I)
    sources = [*PAGES, *(ROOT / "examples").glob("*.md"), ROOT / "k8s" / "README.md"]
    code = [p for p in sorted(ROOT.glob("dartserve/**/*.py")) + sorted(ROOT.glob("services/**/*.py")) if "rpc" not in p.parts]
    for path in [p for p in sources if p.exists()] + code:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            assert not narrative.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
