"""doc/lora.md: each python snippet runs on its own (a reader copies one, not the page) and prints what the page
says it prints."""
import os

from tests.lifecycle.test_lifecycle_doc import ROOT, _snippets, run_snippets


def test_every_lora_page_snippet_runs_standalone_and_prints_what_the_page_says(tmp_path):
    blocks = _snippets(os.path.join(ROOT, 'doc', 'lora.md'))
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        folder = tmp_path / f'snippet_{index}'
        folder.mkdir()
        run_snippets([block], folder)
