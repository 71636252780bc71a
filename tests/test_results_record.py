"""benchmarks/RESULTS.md holds one section per benchmark: a rerun replaces its own, keeps the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import results


@pytest.fixture
def doc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(results, "machine_line", lambda: "2026-01-01, x86_64, 2 CPU cores, torch 2")
    path = tmp_path / "RESULTS.md"
    monkeypatch.setattr(results, "RESULTS", path)
    path.write_text(
        "# Benchmark results\n\nIntro.\n\n"
        "## Step overhead (old machine; fp32)\n\n`python benchmarks/bench_step_overhead.py`\n\n| a |\n| 1 |\n\n"
        "## Memory: ID3 vs full fine-tuning (old machine; 6 steps)\n\n`python benchmarks/bench_memory.py`\n\n"
        "| b |\n| 2 |\n\nA note on memory.\n"
    )
    return path


def sections(path: Path) -> list[str]:
    return results.split_sections(path.read_text())[1]


def test_a_rerun_replaces_its_section_in_place_and_keeps_the_others(doc: Path) -> None:
    before = sections(doc)
    results.record_results("Step overhead", "fp32", "python benchmarks/bench_step_overhead.py --quick", "| a |\n| 9 |")
    after = sections(doc)
    assert len(after) == 2
    assert after[0].startswith("## Step overhead (2026-01-01, x86_64, 2 CPU cores, torch 2; fp32)\n")
    assert "`python benchmarks/bench_step_overhead.py --quick`" in after[0] and "| 9 |" in after[0]
    assert "| 1 |" not in doc.read_text()
    assert after[1] == before[1]  # the memory section, byte for byte, still after it
    assert doc.read_text().startswith("# Benchmark results\n\nIntro.\n\n## Step overhead")


def test_a_new_benchmark_is_appended_and_the_same_run_twice_leaves_one_section(doc: Path) -> None:
    old = doc.read_text()
    for _ in range(2):
        results.record_results("Delta and merge", "bf16", "python benchmarks/bench_delta.py", "base 1 MB")
    text = doc.read_text()
    assert text.startswith(old)
    assert text.count("## Delta and merge (") == 1
    assert text.endswith("`python benchmarks/bench_delta.py`\n\nbase 1 MB\n")
    assert [p.name for p in doc.parent.iterdir()] == ["RESULTS.md"]  # no temporary file left behind


def test_duplicate_sections_of_one_benchmark_collapse_into_the_first_place(doc: Path) -> None:
    doc.write_text(doc.read_text() + "\n## Step overhead (older; fp32)\n\n| a |\n| 0 |\n")
    results.record_results("Step overhead", "fp32", "cmd", "| a |\n| 5 |")
    titles = [s.split(" (", 1)[0] for s in sections(doc)]
    assert titles == ["## Step overhead", "## Memory: ID3 vs full fine-tuning"]
    assert "| 0 |" not in doc.read_text() and "| 1 |" not in doc.read_text()


def test_a_title_that_only_starts_like_another_is_another_benchmark(doc: Path) -> None:
    results.record_results("Memory", "x", "cmd", "| m |")
    titles = [s.split(" (", 1)[0] for s in sections(doc)]
    assert titles == ["## Step overhead", "## Memory: ID3 vs full fine-tuning", "## Memory"]
