"""doc/recompute.md: its python snippet runs and prints what the page says it prints."""
import os

from tests.lifecycle.test_lifecycle_doc import ROOT, _snippets, run_snippets


def test_recompute_page_snippet_runs_and_prints_what_the_page_says(tmp_path):
    blocks = _snippets(os.path.join(ROOT, 'doc', 'recompute.md'))
    assert len(blocks) == 1
    run_snippets(blocks, tmp_path)
