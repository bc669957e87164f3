"""doc/training_hooks.md (PST, AdaLoRA, t-SVD through get_pet_model and the training hook): its python snippets run
in order as one script, and print what the page says they print."""
import os

from tests.lifecycle.test_lifecycle_doc import ROOT, _snippets, run_snippets


def test_training_hooks_snippets_run_and_print_what_the_page_says(tmp_path):
    blocks = _snippets(os.path.join(ROOT, 'doc', 'training_hooks.md'))
    assert len(blocks) == 6
    run_snippets(blocks, tmp_path)
