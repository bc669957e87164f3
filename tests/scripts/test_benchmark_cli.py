"""The benchmark's 'cli' part: start-up of `python -m mindpet --help/--version` beside `import mindspore`, written
to the JSON and the page (figures are recorded, never asserted: the machine's load decides them)."""
from scripts.benchmark import orchestrate, report


def test_cli_part_records_every_call_and_renders_a_table_and_target():
    assert 'cli' in orchestrate.PARTS and 'cli' in orchestrate.parse_args([]).parts
    cli = orchestrate.measure_cli(repeats=1, timeout=600)
    assert set(cli) == set(orchestrate.CLI_CALLS)
    for row in cli.values():
        assert row['wall_min'] <= row['wall_s'] <= row['wall_max'] and row['cpu_s'] >= 0
    assert cli['import_mindspore']['wall_over_import'] == 1.0
    assert cli['help']['command'] == 'python -m mindpet --help'
    page = report.render_markdown({'cli': cli}, 'PYTHONPATH=. python scripts/benchmark.py --parts cli')
    assert '### 7. Command start-up' in page and '`python -m mindpet --help`' in page
    assert "`python -c 'import mindspore'`" in page
    row = {r['what']: r for r in report.evaluate_targets({'cli': cli})}['mindpet --help start-up (s)']
    assert row['value'] == cli['help']['cpu_s'] and row['wall'] == cli['help']['wall_s']
    assert row['met'] == (cli['help']['cpu_s'] <= 0.6)
